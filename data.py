"""
Data for MPNext: corpora, a byte-level BPE tokenizer and pre-training batches.

Everything here is plain Python + numpy + torch and works offline:
- corpora: the default corpus is the docstrings of the Python standard library you are running (~1.6 MB of
  English prose, no download), or Tiny Shakespeare, or any UTF-8 .txt file / directory of .txt files.
- tokenizer: byte-level BPE (Sennrich et al. 2016, GPT-2 flavour), trained in a few seconds, lossless.
- batches: random blocks of the token stream, each row [<s>] + (T-1) tokens, plus per-token
  "starts a word" flags that MPNet-style whole-word masking needs.

    >>> docs = load_documents(None)                    # stdlib docstrings
    >>> tok = Tokenizer.train(docs, vocab_size=8192)
    >>> stream = encode_documents(docs, tok)          # 1-D ids, docs separated by </s>
    >>> x, is_word_start = Batches(stream, tok, seq_len=128, batch_size=32).sample(torch.Generator())
"""

import ast
import csv
import hashlib
import heapq
import io
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A mistake in the user's data or paths. The message is one line: which file, what is wrong, what to do."""


def _cache_dir(cache_dir=None):
    d = Path(cache_dir or os.environ.get("MPNEXT_CACHE") or Path.home() / ".cache" / "mpnext")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic_write(path, data: bytes):
    # write a temp file next to the target, then rename: a crash never leaves a half-written cache behind
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# corpora

DOC_SEP = "\n\x1e\n"  # ASCII record separator: never occurs in the docstrings we keep (we strip it)
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo",
              "ensurepip", "lib2to3"}  # tests and tools: code-like or not prose


def _stdlib_docstrings():
    """(path relative to the stdlib, [docstrings]) per module with prose. Files are visited in sorted order and
    docstrings in source order, so the result is deterministic for a given Python version. We keep docstrings with
    some prose (>= 40 chars and a few spaces)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                tree = ast.parse(Path(root, name).read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue  # a broken file in someone's stdlib should not stop us
            nodes = [n for n in ast.walk(tree)
                     if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # ast.walk is breadth-first; we want source order
            strings = [ast.get_docstring(n) for n in nodes]
            strings = [s.replace("\x1e", "") for s in strings if s and len(s) >= 40 and s.count(" ") >= 5]
            if strings:
                yield os.path.relpath(os.path.join(root, name), stdlib), strings


def default_corpus(cache_dir=None) -> list[str]:
    """The docstrings of the running Python's standard library, one document per module (~1.6 MB; ~4 s once, then
    read from the cache)."""
    cache = _cache_dir(cache_dir) / f"stdlib_docstrings_py{sys.version_info[0]}{sys.version_info[1]}_v1.txt"
    if cache.exists():
        return cache.read_text(encoding="utf-8").split(DOC_SEP)
    docs = ["\n\n".join(strings) for _, strings in _stdlib_docstrings()]
    if not docs:
        raise DataError(f"{sysconfig.get_paths()['stdlib']}: found no standard-library docstrings for the default "
                        f"corpus; pass --data FILE")
    _atomic_write(cache, DOC_SEP.join(docs).encode("utf-8"))
    return docs


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (bad byte at offset {e.start}); re-save it as UTF-8") from None


def _split_paragraphs(text: str, min_chars: int = 2000) -> list[str]:
    """Cut one long text into documents of whole paragraphs, each >= min_chars (the last may be shorter).

    One novel becomes ~500 documents, so a train/val split by document works even for a single file.
    Files without blank lines (one sentence a line) are cut at line ends instead.
    """
    sep = re.compile(r"\n[ \t]*\n\s*" if re.search(r"\n[ \t]*\n", text) else r"\n+")
    docs, start = [], 0
    for m in sep.finditer(text):
        if m.start() - start >= min_chars:
            docs.append(text[start:m.start()])
            start = m.end()
    docs.append(text[start:])
    return [d.strip() for d in docs if d.strip()]


def load_documents(path: str | None, cache_dir=None) -> list[str]:
    """None -> stdlib docstrings; "shakespeare" -> Tiny Shakespeare (downloaded once); a .txt file -> paragraph
    groups of ~2000 chars; a directory -> one document per *.txt file (recursive, sorted)."""
    if path is None:
        return default_corpus(cache_dir)
    if path == "shakespeare" and not Path(path).exists():
        file = _cache_dir(cache_dir) / "tinyshakespeare.txt"
        if not file.exists():
            try:
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=10) as r:
                    _atomic_write(file, r.read())
            except OSError as e:
                raise DataError(f"{file}: could not download Tiny Shakespeare ({e}); download {SHAKESPEARE_URL} "
                                f"to that path, or pass --data FILE") from None
        return _split_paragraphs(_read_text(file))
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; pass a UTF-8 .txt file, a directory of .txt files, "
                        f"'shakespeare', or no --data for the built-in corpus")
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise DataError(f"{p}: directory has no .txt files; put UTF-8 .txt files in it (one document each)")
        docs = [t.strip() for t in map(_read_text, files) if t.strip()]
        if not docs:
            raise DataError(f"{p}: all {len(files)} .txt files are empty; add some text")
        return docs
    docs = _split_paragraphs(_read_text(p))
    if not docs:
        raise DataError(f"{p}: file is empty (or only whitespace); pass a file with some text")
    return docs


def split_documents(docs, val_fraction=0.05, seed=0) -> tuple[list[str], list[str]]:
    """Seeded split by whole documents, so no validation text leaks into training.

    >>> split_documents(["a", "b", "c", "d"], 0.25)   # -> (3 docs, 1 doc), original order kept
    With a single document we cut its text at the (1 - val_fraction) point, on a whitespace boundary.
    """
    docs = list(docs)
    if val_fraction <= 0 or not docs:
        return docs, []
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        m = re.compile(r"\s").search(text, cut)
        cut = m.start() if m else cut
        return [text[:cut]], [text[cut:].strip()] if text[cut:].strip() else []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]

# -----------------------------------------------------------------------------
# tokenizer: byte-level BPE, minbpe-style but with incremental pair counts so 8k merges train in seconds

# GPT-2-style pre-tokenizer in stdlib `re` (no \p{L}): contractions, optional space + letters,
# optional space + 1-3 digits, optional space + punctuation run, whitespace. [^\W\d_] = "letter".
# Every character matches some branch, so "".join(findall(s)) == s and BPE never merges across these chunks.
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
_NEVER = 1 << 62  # "rank" of a pair that was never merged
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4 as in fairseq/MPNet (<pad>=1: HF MPNet
# hard-codes it); <unk> is reserved, byte BPE never needs it


def _merge(ids, pair, new_id):
    """Replace each non-overlapping pair, left to right: _merge([5, 6, 5, 6, 7], (5, 6), 9) -> [9, 9, 7]"""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class _WordCache(dict):
    """pre-token string -> tuple of ids; a miss runs BPE once. Bounded: cleared when it grows too big."""

    def __init__(self, encode_word, max_size=500_000):
        super().__init__()
        self.encode_word, self.max_size = encode_word, max_size

    def __missing__(self, word):
        if len(self) >= self.max_size:
            self.clear()
        ids = self[word] = self.encode_word(word)
        return ids


class Tokenizer:
    """Ids: specials 0..4 (<s> <pad> </s> <unk> <mask>, MPNet's order), then bytes 5..260, then merges 261...

    word_start[i] says whether token i begins a word: specials yes; otherwise yes iff its first byte is a space or
    ASCII punctuation/whitespace/control (" the", ",", "\\n" -> True; "the", "ing", "é" -> False). Non-ASCII bytes
    count as letters so a multi-byte character is never split in two. Caveat: a word at the start of a line
    has no leading space, so the table calls it a continuation; word_start_flags() fixes that per position.
    """

    def __init__(self, merges=()):
        self.merges = [tuple(m) for m in merges]
        self.n_special = len(SPECIAL_TOKENS)
        self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id = range(self.n_special)
        self.vocab = [s.encode() for s in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
        self.ranks = {}  # (a, b) -> merged id; lower id = learned earlier = applied first
        for a, b in self.merges:
            self.ranks[(a, b)] = len(self.vocab)
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.vocab_size = len(self.vocab)
        first = np.array([v[0] for v in self.vocab[self.n_special:]], dtype=np.uint8)
        letter = ((first >= 48) & (first <= 57)) | (((first | 32) >= 97) & ((first | 32) <= 122)) | (first >= 128)
        self.word_start = np.concatenate([np.ones(self.n_special, bool), ~letter])
        # "the next token starts a word": after any special (<s>, </s>) and after a token ending a line
        self.breaks_after = np.array([i < self.n_special or v.endswith(b"\n") for i, v in enumerate(self.vocab)])
        self._pat = re.compile(PATTERN)
        self._cache = _WordCache(self._encode_word)

    @classmethod
    def train(cls, text_or_docs, vocab_size=8192, verbose=False) -> "Tokenizer":
        """Learn up to vocab_size - 261 merges (fewer if a tiny text runs out of pairs, so read tok.vocab_size after).

        Each step merges the most frequent adjacent pair; ties go to the smallest (id_a, id_b), so training is
        deterministic. On "aaabdaaabac" (a=102, b=103, ...):
        aa (4x) -> 261, then ab (2x, beats 261+a by id order) -> 262, then 261+262 -> 263, giving "XdXac".
        """
        tok = cls()
        n_merges = vocab_size - tok.vocab_size
        if n_merges < 0:
            raise DataError(f"vocab_size={vocab_size} is below the {tok.vocab_size} special+byte tokens; raise it")
        docs = [text_or_docs] if isinstance(text_or_docs, str) else text_or_docs
        counts = Counter()  # deduplicate: BPE only needs each distinct pre-token once, with its count
        for d in docs:
            counts.update(tok._pat.findall(d))
        words = [[tok.n_special + b for b in w.encode("utf-8")] for w in counts]
        freq = list(counts.values())
        stats = defaultdict(int)  # pair -> total count over all words
        where = defaultdict(set)  # pair -> indices of the words containing it, so a merge touches only those
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                stats[p] += freq[i]
                where[p].add(i)
        # max-heap via negated counts; entries go stale when counts change and are skipped when popped
        heap = [(-c, a, b) for (a, b), c in stats.items()]
        heapq.heapify(heap)
        merges = []
        while len(merges) < n_merges and heap:
            neg, a, b = heapq.heappop(heap)
            if stats.get((a, b), 0) != -neg:
                continue  # stale entry
            new_id = tok.vocab_size + len(merges)
            merges.append((a, b))
            changed = set()
            for i in where.pop((a, b)):
                old, f = words[i], freq[i]
                new = words[i] = _merge(old, (a, b), new_id)
                old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
                for p in old_pairs:  # take the word out of the tables with its old pairs ...
                    stats[p] -= f
                    where[p].discard(i)
                for p in new_pairs:  # ... and put it back with its new ones
                    stats[p] += f
                    where[p].add(i)
                changed.update(old_pairs, new_pairs)
            for p in changed:
                if stats[p] > 0:
                    heapq.heappush(heap, (-stats[p], p[0], p[1]))
                else:
                    del stats[p]
                    where.pop(p, None)
            if verbose and (len(merges) % 1000 == 0 or len(merges) == n_merges):
                print(f"merge {len(merges)}/{n_merges}: {tok.vocab[a] + tok.vocab[b]!r} ({-neg} occurrences)")
            tok.vocab.append(tok.vocab[a] + tok.vocab[b])  # only for the verbose print above
        return cls(merges)

    def _encode_word(self, word: str) -> tuple:
        ids = [self.n_special + b for b in word.encode("utf-8")]
        while len(ids) >= 2:
            # apply the earliest-learned merge present (= smallest merged id), exactly as training did
            best = min(map(self.ranks.get, zip(ids, ids[1:]), repeat(_NEVER)))
            if best == _NEVER:
                break
            ids = _merge(ids, self.merges[best - 256 - self.n_special], best)
        return tuple(ids)

    def encode(self, text: str, specials=False) -> list[int]:
        """Text -> ids. By default never emits specials: "<mask>" in text is just bytes. With specials=True the names
        of SPECIAL_TOKENS become their ids, and "<mask>" takes the space before it, as RoBERTa's mask does: in
        "the <mask> sat" it stands for one token " cat" (spaces belong to the following word in this BPE). Each
        distinct pre-token is BPE'd once and cached, so encoding is mostly a regex pass plus dict lookups (~6 MB/s;
        ~14 MB/s once warm)."""
        if specials:
            parts = re.split("( ?<mask>|" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")", text)
            return [i for k, p in enumerate(parts) for i in
                    ([SPECIAL_TOKENS.index(p.strip())] if k % 2 else self.encode(p))]
        return list(chain.from_iterable(map(self._cache.__getitem__, self._pat.findall(text))))

    def decode(self, ids) -> str:
        """ids -> text; <pad> is skipped, other specials are shown by name, broken UTF-8 becomes U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return b"".join(self.vocab[i] for i in ids if i != self.pad_id).decode("utf-8", errors="replace")

    def id_to_piece(self, i) -> str:
        return self.vocab[int(i)].decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        """Short hash that changes whenever the encoding would change (used to validate caches)."""
        return hashlib.sha256(json.dumps([PATTERN, SPECIAL_TOKENS, self.merges]).encode()).hexdigest()[:16]

    @property
    def special_ids(self):
        return tuple(range(self.n_special))

    def save(self, path):
        """To a file, or to DIR/tokenizer.json when path is a directory (as load_tokenizer reads it)."""
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        obj = {"format": "mpnext-bpe", "version": 2, "pattern": PATTERN, "special_tokens": SPECIAL_TOKENS,
               "merges": [list(m) for m in self.merges]}
        _atomic_write(path, json.dumps(obj).encode())

    def to_hf(self, out_dir, max_len=512):
        """Write this tokenizer in the Hugging Face `tokenizers` format (tokenizer.json, plus tokenizer_config.json and
        special_tokens_map.json) so that transformers.AutoTokenizer.from_pretrained(out_dir) encodes exactly as
        encode() does, with <s> ... </s> around a text and RoBERTa's pair format. No dependency: plain JSON. The BPE's
        byte tokens are written in GPT-2's printable byte alphabet, as byte-level BPEs in that format are; the
        pre-tokenizer is our PATTERN, the <mask> token takes the space before it (as encode(specials=True) does)."""
        printable = [b for b in range(256) if chr(b).isprintable() and not chr(b).isspace() and b != 173]
        byte_char = {b: chr(b) for b in printable}  # GPT-2's bytes_to_unicode: the rest go to 256, 257, ...
        byte_char.update({b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in byte_char)})

        def piece(i):
            return "".join(byte_char[b] for b in self.vocab[i])

        special = [dict(id=i, content=t, single_word=False, lstrip=t == "<mask>", rstrip=False, normalized=False,
                        special=True) for i, t in enumerate(SPECIAL_TOKENS)]
        byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)
        obj = dict(version="1.0", truncation=None, padding=None, added_tokens=special, normalizer=None,
                   pre_tokenizer=dict(type="Sequence", pretokenizers=[
                       dict(type="Split", pattern=dict(Regex=PATTERN), behavior="Isolated", invert=False), byte_level]),
                   post_processor=dict(type="RobertaProcessing", sep=["</s>", self.eos_id], cls=["<s>", self.bos_id],
                                       trim_offsets=False, add_prefix_space=False),
                   decoder=byte_level,
                   model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                              end_of_word_suffix=None, fuse_unk=False, byte_fallback=False, ignore_merges=False,
                              vocab={**{t: i for i, t in enumerate(SPECIAL_TOKENS)},
                                     **{piece(i): i for i in range(self.n_special, self.vocab_size)}},
                              merges=[[piece(a), piece(b)] for a, b in self.merges]))
        names = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                     pad_token="<pad>", mask_token="<mask>")
        config = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_len, **names)
        os.makedirs(out_dir, exist_ok=True)
        for name, content in (("tokenizer.json", obj), ("tokenizer_config.json", config),
                              ("special_tokens_map.json", names)):
            _atomic_write(os.path.join(out_dir, name), json.dumps(content, ensure_ascii=False).encode("utf-8"))

    @classmethod
    def load(cls, path) -> "Tokenizer":
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read tokenizer ({type(e).__name__}); retrain or fix the path") from None
        if not isinstance(obj, dict) or obj.get("format") != "mpnext-bpe" or obj.get("pattern") != PATTERN \
                or obj.get("special_tokens") != SPECIAL_TOKENS:
            raise DataError(f"{path}: not a tokenizer saved by this version of data.py; delete it to retrain")
        return cls(obj["merges"])

class HFTokenizer:
    """A checkpoint's own Hugging Face tokenizer (MPNet's WordPiece) behind the interface of Tokenizer, so that the
    batches, the masks and every objective run on it unchanged. `transformers` is imported only here. Word starts
    follow WordPiece's convention: a piece starting with "##" continues a word, every other piece starts one."""

    def __init__(self, name_or_path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(f"{name_or_path}: reading a Hugging Face checkpoint needs `transformers`; "
                            f"pip install transformers") from None
        try:
            self.hf = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as e:  # no such directory, no tokenizer files, hub unreachable
            raise DataError(f"{name_or_path}: no Hugging Face tokenizer there ({type(e).__name__}); pass an MPNet "
                            f"checkpoint directory, or a hub name while online") from None
        h = self.hf
        ids = (h.bos_token_id, h.pad_token_id, h.eos_token_id, h.unk_token_id, h.mask_token_id)
        if None in ids:
            raise DataError(f"{name_or_path}: the tokenizer lacks one of <s> <pad> </s> <unk> <mask>; MPNet needs all")
        self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id = ids
        self.vocab_size = len(h)
        self.special_ids = tuple(sorted(set(h.all_special_ids)))
        pieces = h.convert_ids_to_tokens(list(range(self.vocab_size)))
        self.word_start = np.array([not p.startswith("##") for p in pieces])
        self.breaks_after = np.isin(np.arange(self.vocab_size), self.special_ids)
        self.fingerprint = hashlib.sha256(json.dumps(pieces).encode()).hexdigest()[:16]

    def encode(self, text: str, specials=False) -> list[int]:
        return self.hf(text, add_special_tokens=False, split_special_tokens=not specials)["input_ids"]

    def decode(self, ids) -> str:
        return self.hf.decode(ids.tolist() if hasattr(ids, "tolist") else ids)

    def save(self, out_dir):
        self.hf.save_pretrained(os.path.join(out_dir, "hf_tokenizer"))

    def to_hf(self, out_dir, max_len=None):
        self.hf.save_pretrained(out_dir)  # the checkpoint's own files


def load_tokenizer(run_dir):
    """The tokenizer a run saved: MPNext's BPE (tokenizer.json) or a checkpoint's own (hf_tokenizer/)."""
    hf = os.path.join(run_dir, "hf_tokenizer")
    return HFTokenizer(hf) if os.path.isdir(hf) else Tokenizer.load(os.path.join(run_dir, "tokenizer.json"))


# -----------------------------------------------------------------------------
# batches


def encode_documents(docs, tok, cache_path=None) -> np.ndarray:
    """Concatenate tok.encode(doc) + [</s>] for every doc (fairseq/MPNet use </s> as the document separator).

    Returns uint16 when the vocab fits (half the memory), else int32. With cache_path, the result is saved
    together with a fingerprint of (tokenizer, texts) and reused only when both match.
    """
    h = hashlib.sha256(tok.fingerprint.encode())
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass") + b"\x00")
    fingerprint = h.hexdigest()
    if cache_path is not None and Path(cache_path).exists():
        try:
            with np.load(cache_path) as z:
                if str(z["fingerprint"]) == fingerprint:
                    return z["ids"]
        except Exception:
            pass  # unreadable or foreign cache file: rebuild it
    ids = []
    for d in docs:
        ids += tok.encode(d)
        ids.append(tok.eos_id)
    if len(ids) == len(docs):  # nothing but separators
        raise DataError(f"{cache_path or 'corpus'}: no tokens to train on (the documents are empty); pass some text")
    stream = np.array(ids, dtype=np.uint16 if tok.vocab_size <= 65536 else np.int32)
    if cache_path is not None:
        buf = io.BytesIO()
        np.savez(buf, ids=stream, fingerprint=np.array(fingerprint))
        _atomic_write(cache_path, buf.getvalue())
    return stream


def word_start_flags(ids, tok):
    """Per-position "starts a word" flags for a 1-D or (B, T) array/tensor of ids (same type back, bool).

    tok.word_start[ids], with position 0 and every position after a special or a line end forced True,
    so "Hello" at the start of a line counts as a word although it has no leading space.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.long()
        ws, br = torch.from_numpy(tok.word_start)[ids], torch.from_numpy(tok.breaks_after)[ids]
    else:
        ws, br = tok.word_start[ids], tok.breaks_after[ids]
    ws[..., 1:] |= br[..., :-1]
    ws[..., :1] = True
    return ws


class Batches:
    """Blocks of seq_len tokens: [<s>] + (seq_len - 1) consecutive stream tokens, plus their word-start flags."""

    def __init__(self, stream: np.ndarray, tok, seq_len: int, batch_size: int, name="train"):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one <s> plus text), got {seq_len}")
        if len(stream) < seq_len:
            raise DataError(f"{name} corpus of {len(stream)} tokens is shorter than one block of seq_len={seq_len}; "
                            f"use a smaller --seq-len or more text")
        self.tok, self.seq_len, self.batch_size, self.name = tok, seq_len, batch_size, name
        self.stream = torch.from_numpy(np.asarray(stream).astype(np.int64))
        self.flags = torch.from_numpy(word_start_flags(np.asarray(stream), tok))

    def _rows(self, starts):
        idx = starts[:, None] + torch.arange(self.seq_len - 1)  # (B, T-1)
        x = torch.full((len(starts), self.seq_len), self.tok.bos_id, dtype=torch.long)
        x[:, 1:] = self.stream[idx]
        f = torch.ones(len(starts), self.seq_len, dtype=torch.bool)
        f[:, 2:] = self.flags[idx[:, 1:]]  # column 0 is <s>, column 1 follows <s>: both start a word
        return x, f

    def sample(self, generator: torch.Generator):
        """Random blocks, (B, T) long ids and (B, T) bool flags. All randomness comes from `generator`."""
        high = len(self.stream) - (self.seq_len - 1) + 1
        return self._rows(torch.randint(0, high, (self.batch_size,), generator=generator))

    def iterate(self):
        """Non-overlapping blocks in stream order (for evaluation); the trailing partial block is dropped."""
        starts = torch.arange(len(self.stream) // (self.seq_len - 1)) * (self.seq_len - 1)
        for i in range(0, len(starts), self.batch_size):
            yield self._rows(starts[i:i + self.batch_size])

# -----------------------------------------------------------------------------
# downstream tasks: labelled texts for fine-tuning and probing

SPLITS = ("train", "dev", "test")
_SPLIT_NAMES = {"train": "train", "dev": "dev", "valid": "dev", "validation": "dev", "val": "dev", "test": "test"}
_NOT_A_CLASS = ("readme", "license", "sha256sums", ".")  # files in a class directory that hold no examples


@dataclass
class Task:
    name: str
    labels: list  # label names; a label id indexes this list
    splits: dict  # "train" | "dev" | "test" -> (texts: list of 1- or 2-tuples of str, label ids: list of int)
    pooled: bool = False  # the splits were drawn from one pool by seed (not given as train/dev/test files)


def stdlib_task(cache_dir=None, n_classes=8):
    """The built-in task, offline: which standard-library package (asyncio, email, logging, ...) a docstring comes
    from, over the n_classes packages with the most docstrings (~2,300 examples on Python 3.11). The default
    pre-training corpus holds the same docstrings, unlabelled: like in-domain pre-training, never the labels."""
    cache = _cache_dir(cache_dir) / f"stdlib_packages_py{sys.version_info[0]}{sys.version_info[1]}_v1.json"
    if cache.exists():
        return json.loads(cache.read_text(encoding="utf-8"))
    by_package = defaultdict(list)
    for rel, strings in _stdlib_docstrings():
        if os.sep in rel:  # a module inside a package directory
            by_package[rel.split(os.sep)[0]] += strings
    top = sorted(by_package, key=lambda p: (-len(by_package[p]), p))[:n_classes]
    rows = [[text, package] for package in sorted(top) for text in by_package[package]]
    _atomic_write(cache, json.dumps(rows).encode("utf-8"))
    return rows


def _read_table(path: Path, label_col: str, text_cols: str):
    """A CSV or TSV file with a header -> (texts as tuples, label strings)."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty; give it a header line and one example per line")
    delimiter = "\t" if path.suffix in (".tsv", ".tab") or "\t" in text.split("\n", 1)[0] else ","
    header, *rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r]
    if label_col not in header:
        raise DataError(f"{path}: no column {label_col!r} in the header {header}; name the label column with "
                        f"--label-col")
    cols = text_cols.split(",") if text_cols else [c for c in header if c != label_col]
    if not 1 <= len(cols) <= 2 or any(c not in header or c == label_col for c in cols):
        raise DataError(f"{path}: text columns {cols} must be one or two of {header}, not the label; pick them with "
                        f"--text-cols")
    for line, r in enumerate(rows, 2):
        if len(r) != len(header):
            raise DataError(f"{path}: line {line} has {len(r)} fields, the header {len(header)}; fix the quoting")
    at = [header.index(c) for c in cols]
    return [tuple(r[i] for i in at) for r in rows], [r[header.index(label_col)] for r in rows]


def _read_examples(path: Path, label_col, text_cols):
    """A table file, or a directory with one file per class (one example per line; the name is the label)."""
    if path.is_file():
        return _read_table(path, label_col, text_cols)
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.lower().startswith(_NOT_A_CLASS))
    texts, labels = [], []
    for f in files:
        lines = [line.strip() for line in _read_text(f).splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{f}: empty class file; put one example per line, or remove it")
        texts += [(line,) for line in lines]
        labels += [f.name[:-4] if f.name.endswith(".txt") else f.name] * len(lines)
    return texts, labels


def _dedup(texts, labels, where):
    """Drop repeated examples and texts that occur under two labels (neither label can be right)."""
    seen = defaultdict(set)
    for t, y in zip(texts, labels):
        seen[t].add(y)
    kept, out = set(), ([], [])
    for t, y in zip(texts, labels):
        if len(seen[t]) == 1 and t not in kept:
            kept.add(t)
            out[0].append(t)
            out[1].append(y)
    if not texts:
        raise DataError(f"{where}: no examples (an empty directory, or a table with a header only); add some")
    if not out[0]:
        raise DataError(f"{where}: no examples left after removing duplicates and conflicting labels")
    return out


def _take(split, idx):
    """(texts, labels) at the indices idx."""
    return [split[0][i] for i in idx], [split[1][i] for i in idx]


def _stratified(labels, fractions, rng):
    """Index lists, one per fraction (the last takes the rest), each with every class in proportion."""
    by_class = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    parts = [[] for _ in fractions]
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        start = 0
        for k, f in enumerate(fractions[:-1]):
            n = round(len(idx) * f)
            parts[k] += idx[start:start + n]
            start += n
        parts[-1] += idx[start:]
    return [sorted(p) for p in parts]


def _subsample(labels, n, rng):
    """n indices, every class in proportion and at least once (largest remainders get the rest), sorted."""
    by_class = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    share = {y: n * len(ix) / len(labels) for y, ix in by_class.items()}
    take = {y: max(1, int(s)) for y, s in share.items()}
    for y in sorted(share, key=lambda y: take[y] - share[y])[:max(0, n - sum(take.values()))]:
        take[y] += 1
    while sum(take.values()) > n:  # the at-least-one rule overshot: trim the largest classes
        take[max(take, key=take.get)] -= 1
    keep = []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        keep += idx[:take[y]]
    return sorted(keep)


def load_task(path: str | None, seed=0, train_size=0, label_col="label", text_cols="", cache_dir=None) -> Task:
    """A labelled task. path: None -> the built-in stdlib-package task; a CSV/TSV file with a header; a directory with
    one file per class (e.g. pos.txt, neg.txt: one example per line); or a directory holding train / dev / test files
    (each a table or a class directory). One file or class directory is split 80/10/10, stratified and seeded, after
    duplicates and texts under two labels are dropped. train_size > 0 keeps that many training examples (stratified)."""
    rng = random.Random(seed)
    if path is None:
        rows = stdlib_task(cache_dir)
        name, named = "stdlib-packages", {"all": ([(t,) for t, _ in rows], [y for _, y in rows])}
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"{p}: no such file or directory; pass a CSV/TSV file or a directory of class files")
        name = p.stem if p.is_file() else p.name
        parts = {_SPLIT_NAMES.get(f.name.split(".")[0].lower()): f for f in sorted(p.iterdir())} if p.is_dir() else {}
        parts.pop(None, None)
        if parts and "train" not in parts:
            raise DataError(f"{p}: has {sorted(parts)} but no train file; add one, or remove the split files")
        named = {s: _read_examples(f, label_col, text_cols) for s, f in parts.items()} or {
            "all": _read_examples(p, label_col, text_cols)}
    named = {s: _dedup(*v, f"{path or name} ({s})") for s, v in named.items()}
    pooled = "all" in named
    if pooled:  # one pool: a seeded stratified split
        pool = named.pop("all")
        parts = _stratified(pool[1], [0.8, 0.1, 0.1], rng)
        named = {s: _take(pool, ix) for s, ix in zip(("train", "dev", "test"), parts)}
    seen = set(named["train"][0])  # a dev/test text that also occurs in train would be a leak: dropped
    for s in ("dev", "test"):
        if s in named:
            named[s] = _take(named[s], [i for i, t in enumerate(named[s][0]) if t not in seen])
    for s in ("dev", "test"):  # a split the directory lacks: 10% of train
        if s not in named:
            rest, held = _stratified(named["train"][1], [0.9, 0.1], rng)
            named["train"], named[s] = _take(named["train"], rest), _take(named["train"], held)
    label_names = sorted(set(named["train"][1]))
    if len(label_names) < 2:
        raise DataError(f"{path or name}: the training examples have a single class {label_names}; a classifier "
                        f"needs at least two")
    for s in ("dev", "test"):
        unseen = sorted(set(named[s][1]) - set(label_names))
        if unseen:
            raise DataError(f"{path or name}: {s} has label(s) {unseen[:5]} that never occur in train; fix the "
                            f"labels or add training examples")
    if train_size:
        n = len(named["train"][0])
        if train_size < len(label_names) or train_size > n:
            raise DataError(f"--train-size {train_size}: pick between {len(label_names)} (one per class) and "
                            f"{n} (all training examples)")
        named["train"] = _take(named["train"], _subsample(named["train"][1], train_size, rng))
    for s in SPLITS:
        if not named[s][0]:
            raise DataError(f"{path or name}: the {s} split is empty (too few examples per class); add examples")
    ids = {y: i for i, y in enumerate(label_names)}
    return Task(name, label_names, {s: (named[s][0], [ids[y] for y in named[s][1]]) for s in SPLITS}, pooled)


def encode_examples(texts, tok, max_len):
    """Each 1- or 2-tuple of texts -> ids `<s> a </s>` or `<s> a </s></s> b </s>` (MPNet/RoBERTa's pair format),
    at most max_len long: the longer text loses tokens at its end first."""
    rows = []
    for t in texts:
        parts = [tok.encode(x) for x in t]
        budget = max_len - (2 if len(parts) == 1 else 4)
        while sum(map(len, parts)) > budget:
            max(parts, key=len).pop()
        body = parts[0] if len(parts) == 1 else parts[0] + [tok.eos_id, tok.eos_id] + parts[1]
        rows.append([tok.bos_id] + body + [tok.eos_id])
    return rows


def pad_rows(rows, pad_id):
    """List of id lists -> (B, T) long tensor padded with pad_id, T = the longest row."""
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
