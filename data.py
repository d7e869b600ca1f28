"""
Data for MPNext, offline: corpora (the running Python's standard-library docstrings, ~1.6 MB of English prose; Tiny
Shakespeare; your UTF-8 .txt files), a byte-level BPE tokenizer (Sennrich et al. 2016, GPT-2 flavour; trained in
seconds, lossless), runs on disk, and batches: [<s>] + (T-1) tokens with the word-start flags whole-word masking needs.

    >>> tok = Tokenizer.train(docs := load_documents(None), vocab_size=8192)   # the stdlib docstrings
    >>> x, is_word_start = Batches(encode_documents(docs, tok), tok, 128, 32).sample(torch.Generator())
"""

import ast
import dataclasses
import functools
import hashlib
import heapq
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import urllib.request
from collections import Counter, defaultdict
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import torch

import mpnext


class DataError(ValueError):
    """A mistake in the user's data or paths. The message is one line: which file, what is wrong, what to do."""


def _cache_dir(cache_dir=None):
    d = Path(cache_dir or os.environ.get("MPNEXT_CACHE") or Path.home() / ".cache" / "mpnext")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _file_mode():
    umask = os.umask(0)  # (the only way to read it)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path, data):
    """bytes, or a function writing to a file object, into a temp file then renamed: a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    os.chmod(tmp, _file_mode())  # mkstemp's 0600 would hide a run from the user's group
    with os.fdopen(fd, "wb") as f:
        data(f) if callable(data) else f.write(data)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# corpora

DOC_SEP = "\n\x1e\n"  # ASCII record separator: never occurs in the docstrings we keep (we strip it)
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo",
              "ensurepip", "lib2to3"}  # tests and tools: code-like or not prose


def _stdlib_docstrings():
    """(path relative to the stdlib, [docstrings with some prose]) per module: files in sorted order, docstrings in
    source order, so the result is deterministic for a given Python version."""
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
            strings = [s.replace("\x1e", "") for s in map(ast.get_docstring, nodes) if s and len(s) >= 40
                       and s.count(" ") >= 5]
            if strings:
                yield os.path.relpath(os.path.join(root, name), stdlib), strings


def default_corpus(cache_dir=None) -> list[str]:
    """The docstrings of the running Python's standard library, one document per module (built once, then cached)."""
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
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (bad byte at offset {e.start}); re-save it as UTF-8") from None


def _split_paragraphs(text: str, min_chars: int = 2000) -> list[str]:
    """Cut one long text into documents of whole paragraphs, each >= min_chars (the last may be shorter), so that a
    split by document works for a single novel; files without blank lines (a sentence a line) are cut at line ends."""
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
    p = Path(path)
    if path == "shakespeare" and not p.exists():
        p = _cache_dir(cache_dir) / "tinyshakespeare.txt"
        if not p.exists():
            try:
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=10) as r:
                    _atomic_write(p, r.read())
            except OSError as e:
                raise DataError(f"{p}: could not download Tiny Shakespeare ({e}); download {SHAKESPEARE_URL} "
                                f"to that path, or pass --data FILE") from None
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; pass a UTF-8 .txt file, a directory of .txt files, "
                        f"'shakespeare', or no --data for the built-in corpus")
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        skipped = sorted({f.suffix or f.name for f in p.rglob("*") if f.is_file() and f.suffix != ".txt"})
        if not files:
            raise DataError(f"{p}: directory has no .txt files; put UTF-8 .txt files in it (one document each)")
        if skipped:  # say it (on stdout: rank 0's alone under torchrun): else .pos/.neg beside a README.txt go unseen
            print(f"note: {p}: read its {len(files)} .txt file(s) ({', '.join(f.name for f in files[:3])}), skipped "
                  f"its other files ({' '.join(skipped)}); rename text files to .txt to train on them")
        docs = [t.strip() for t in map(_read_text, files) if t.strip()]
    else:
        docs = _split_paragraphs(_read_text(p))
    if not docs:
        raise DataError(f"{p}: empty (or only whitespace); pass some text")
    return docs


def split_documents(docs, val_fraction=0.05, seed=0) -> tuple[list[str], list[str]]:
    """Seeded split by whole documents, so no validation text leaks into training (order kept); a single document
    is cut at the (1 - val_fraction) point, on a whitespace boundary."""
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


class Tokenizer:
    """Ids: specials 0..4 (<s> <pad> </s> <unk> <mask>, MPNet's order), then bytes 5..260, then merges 261...
    word_start[i]: token i begins a word, i.e. is a special or its first byte is a space or ASCII punctuation,
    whitespace or control (" the", ",", "\\n": yes; "the", "ing", "é": no; non-ASCII bytes count as letters, so a
    character is never split). A word at a line start has no space: word_start_flags() fixes that per position."""

    def __init__(self, merges=()):
        self.merges = [tuple(m) for m in merges]
        self.n_special, self.special_ids = len(SPECIAL_TOKENS), tuple(range(len(SPECIAL_TOKENS)))
        self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id = self.special_ids
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
        self._cached = functools.lru_cache(maxsize=500_000)(self._encode_word)  # each distinct pre-token: BPE once

    @classmethod
    def train(cls, text_or_docs, vocab_size=8192) -> "Tokenizer":
        """Learn up to vocab_size - 261 merges (fewer if a tiny text runs out of pairs, so read tok.vocab_size after).
        Each step merges the most frequent adjacent pair, ties to the smallest (id_a, id_b): deterministic. On
        "aaabdaaabac" (a=102, b=103, ...): aa (4x) -> 261, then ab (2x, beats 261+a by id order) -> 262, then
        261+262 -> 263, giving "XdXac"."""
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
        """Text -> ids; "<mask>" in text is just bytes, unless specials=True: then the names of SPECIAL_TOKENS become
        their ids, and "<mask>" takes the space before it, as in RoBERTa ("the <mask> sat" hides one token " cat")."""
        if specials:
            parts = re.split("( ?<mask>|" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")", text)
            return [i for k, p in enumerate(parts) for i in
                    ([SPECIAL_TOKENS.index(p.strip())] if k % 2 else self.encode(p))]
        return list(chain.from_iterable(map(self._cached, self._pat.findall(text))))

    def decode(self, ids) -> str:
        """ids -> text; <pad> is skipped, other specials are shown by name, broken UTF-8 becomes U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return b"".join(self.vocab[i] for i in ids if i != self.pad_id).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        """Short hash that changes whenever the encoding would change (used to validate caches)."""
        return hashlib.sha256(json.dumps([PATTERN, SPECIAL_TOKENS, self.merges]).encode()).hexdigest()[:16]

    def save(self, path):
        """To a file, or to DIR/tokenizer.json when path is a directory (as load_tokenizer reads it)."""
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        obj = {"format": "mpnext-bpe", "version": 2, "pattern": PATTERN, "special_tokens": SPECIAL_TOKENS,
               "merges": [list(m) for m in self.merges]}
        _atomic_write(path, json.dumps(obj).encode())

    def to_hf(self, out_dir, max_len=512):
        """This tokenizer as Hugging Face `tokenizers` JSON: AutoTokenizer encodes as encode(specials=True), <s>...</s>
        around a text and RoBERTa's pair format; bytes in GPT-2's printable alphabet, as byte-level BPEs there are."""
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
    """A checkpoint's own Hugging Face tokenizer (MPNet's WordPiece) behind Tokenizer's interface, so that every
    objective runs on it unchanged; a piece starting with "##" continues a word (WordPiece), all others start one."""

    def __init__(self, name_or_path, offline=False):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(f"{name_or_path}: a Hugging Face checkpoint needs: pip install transformers") from None
        try:
            self.hf = h = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
        except Exception as e:  # no tokenizer files; with offline, a hub name not in the local cache
            where = "in the local Hugging Face cache, and the hub is unreachable" if offline else "there"
            raise DataError(f"{name_or_path}: no Hugging Face tokenizer {where} ({type(e).__name__}); pass an MPNet "
                            f"checkpoint directory") from None
        self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id = ids = (
            h.bos_token_id, h.pad_token_id, h.eos_token_id, h.unk_token_id, h.mask_token_id)
        if None in ids:
            raise DataError(f"{name_or_path}: the tokenizer lacks one of <s> <pad> </s> <unk> <mask>; MPNet needs all")
        self.vocab_size, self.special_ids = len(h), tuple(sorted(set(h.all_special_ids)))
        pieces = h.convert_ids_to_tokens(list(range(self.vocab_size)))
        self.word_start = np.array([not p.startswith("##") for p in pieces])
        self.breaks_after = np.isin(np.arange(self.vocab_size), self.special_ids)
        self.fingerprint = hashlib.sha256(json.dumps(pieces).encode()).hexdigest()[:16]
        # a sentence-transformers layout (modules.json, pooling) goes with the tokenizer into every run and export
        from transformers.utils import cached_file
        find = functools.partial(cached_file, name_or_path, local_files_only=offline,  # a path, or None
                                 **dict.fromkeys(("_raise_exceptions_for_missing_entries",
                                                  "_raise_exceptions_for_connection_errors"), False))
        modules = json.loads(Path(found).read_text()) if (found := find(filename="modules.json")) else []
        names = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"] + [
            m["path"] + "/config.json" for m in modules if m.get("path")]
        self.st_files = {n: Path(f).read_text() for n in names if modules and (f := find(filename=n))}

    def encode(self, text: str, specials=False) -> list[int]:
        return self.hf(text, add_special_tokens=False, split_special_tokens=not specials, verbose=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.hf.decode(ids.tolist() if hasattr(ids, "tolist") else ids)

    def save(self, out_dir):
        self.to_hf(os.path.join(out_dir, "hf_tokenizer"))

    def to_hf(self, out_dir, max_len=None):
        self.hf.save_pretrained(out_dir)  # the checkpoint's own files
        for name, text in self.st_files.items():
            _atomic_write(os.path.join(out_dir, name), text.encode())


def load_tokenizer(run_dir):
    """The tokenizer a run saved: MPNext's BPE (tokenizer.json) or a checkpoint's own (hf_tokenizer/)."""
    hf = os.path.join(run_dir, "hf_tokenizer")
    return HFTokenizer(hf) if os.path.isdir(hf) else Tokenizer.load(os.path.join(run_dir, "tokenizer.json"))


# -----------------------------------------------------------------------------
# runs on disk: DIR/tokenizer.json and DIR/*_tokens.npz (above), DIR/ckpt.pt, DIR/log.jsonl; checkpoints in and out

def check_out_dir(path, flag):
    """An output directory may not be a file, nor a Hugging Face checkpoint (its tokenizer.json would be lost)."""
    if os.path.isfile(path):
        raise DataError(f"{flag} {path} is a file; name a directory")
    if os.path.exists(os.path.join(path, "config.json")):
        raise DataError(f"{flag} {path} holds a Hugging Face checkpoint (config.json); pick another directory")


def check_export_dir(run_dir, out_dir):
    if os.path.abspath(run_dir) == os.path.abspath(out_dir):
        raise DataError(f"export to {out_dir}: that is the run's own directory; name another one")
    if os.path.isfile(out_dir) or os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise DataError(f"export to {out_dir}: a file, or a directory holding an MPNext run; name a new directory")


def read_run(run_dir):
    """The checkpoint dict of a run directory, on the CPU, loaded with weights_only; or one DataError."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise DataError(f"{run_dir}: no ckpt.pt there; pass the --out-dir of a pre-training or fine-tuning run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = ckpt["model_config"]
    except Exception as e:  # a corrupt file, or another program's
        raise DataError(f"{path}: not an MPNext checkpoint ({type(e).__name__}); use another run") from None
    if "whole_word" in config:  # a checkpoint saved before the masking field existed
        config["masking"] = "word" if config.pop("whole_word") else "token"
    return ckpt


def check_init(path):
    """--init names a directory or a hub name ("org/name"); anything else is refused at once. True: a hub name."""
    if os.path.isdir(path):
        return False
    if path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise DataError(f"--init {path}: no such run or checkpoint directory; pass a run's --out-dir, a Hugging Face "
                        f"checkpoint directory, or a hub name such as microsoft/mpnet-base")
    return True


def read_init(path):
    """--init: (model config, weights, tokenizer) of an MPNext run directory, or of a Hugging Face MPNet checkpoint
    (a directory or a hub name) with its own tokenizer."""
    offline = False
    if check_init(path):
        try:  # one quick try: transformers would retry for most of a minute before it says so
            urllib.request.urlopen(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout=5).close()
        except OSError as e:  # (an HTTP error is an answer: the hub is there; else read only the local cache)
            offline = not isinstance(e, urllib.request.HTTPError)
    if os.path.exists(os.path.join(path, "ckpt.pt")):
        ckpt = read_run(path)
        return mpnext.MPNextConfig(**{**ckpt["model_config"], "n_classes": 0}), ckpt["model"], load_tokenizer(path)
    tok = HFTokenizer(path, offline)
    try:
        import transformers
        transformers.logging.set_verbosity_error(), transformers.logging.disable_progress_bar()  # no load report
        hf, info = transformers.MPNetForMaskedLM.from_pretrained(path, local_files_only=offline,
                                                                 output_loading_info=True)
        model = mpnext.MPNext.from_hf(hf, mask_id=tok.mask_id)
    except Exception as e:
        raise DataError(f"--init {path}: not an MPNet checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                        ) from None
    if model.cfg.vocab_size != tok.vocab_size or model.cfg.pad_id != tok.pad_id:
        raise DataError(f"--init {path}: its tokenizer ({tok.vocab_size} tokens, pad {tok.pad_id}) does not fit its "
                        f"model ({model.cfg.vocab_size}, pad {model.cfg.pad_id})")
    fresh = "lm_head.dense.weight" in info["missing_keys"]  # a sentence encoder: HF's random LM head goes, ours is
    state = {k: v for k, v in model.state_dict().items() if not (fresh and k.startswith("head_"))}  # seeded
    return dataclasses.replace(model.cfg, special_ids=tok.special_ids), state, tok


def open_log(out_dir, step, rank=0):
    """DIR/log.jsonl, written line by line by rank 0 alone; a resumed run keeps the rows up to its checkpoint."""
    def logged_step(line):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return float("inf")  # a row cut off by a crash: dropped
    path, kept = os.path.join(out_dir, "log.jsonl"), []
    if step and os.path.exists(path):
        kept = [line for line in open(path) if logged_step(line) <= step]
    log = open(path if rank == 0 else os.devnull, "w", buffering=1)
    log.writelines(kept)
    return log


def export_hf(model, tok, out_dir, labels=None):
    """A model and its tokenizer as a Hugging Face checkpoint, for transformers' pipeline("fill-mask") (or, with the
    labels of a fine-tuned run, pipeline("text-classification"))."""
    model.to_hf(out_dir, labels)
    tok.to_hf(out_dir, model.cfg.max_len)
    if os.path.exists(weights := os.path.join(out_dir, "model.safetensors")):  # safetensors writes 0600 (the rest
        os.chmod(weights, _file_mode())  # follows the umask already); other files in out_dir stay as they were
    print(f"wrote {out_dir}: transformers.AutoModelFor{'SequenceClassification' if labels else 'MaskedLM'}"
          f".from_pretrained({out_dir!r}) and AutoTokenizer.from_pretrained({out_dir!r}) load it")


# -----------------------------------------------------------------------------
# batches

def encode_documents(docs, tok, cache_path=None) -> np.ndarray:
    """tok.encode(doc) + [</s>] for every doc, concatenated (fairseq/MPNet separate documents by </s>); uint16 when
    the vocabulary fits. With cache_path, saved with a fingerprint of (tokenizer, texts), reused when both match."""
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
    ids = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    stream = np.array(ids, dtype=np.uint16 if tok.vocab_size <= 65536 else np.int32)
    if cache_path is not None:
        _atomic_write(cache_path, lambda f: np.savez(f, ids=stream, fingerprint=np.array(fingerprint)))
    return stream


def word_start_flags(ids, tok):
    """Per-position "starts a word" flags (bool) for a 1-D or (B, T) array of ids: position 0 and every position
    after a special or a line end start one, so "Hello" at a line start counts without a space."""
    ws, br = tok.word_start[ids], tok.breaks_after[ids]
    ws[..., 1:] |= br[..., :-1]
    ws[..., :1] = True
    return ws


class Batches:
    """Blocks of seq_len tokens: [<s>] + (seq_len - 1) consecutive stream tokens, plus their word-start flags."""

    def __init__(self, stream: np.ndarray, tok, seq_len: int, batch_size: int, name="train"):
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


def prepare(path, out_dir, seq_len, batch_sizes, tok=None, vocab=4096, seed=0, rank=0):
    """A run's corpus as (tokenizer, training batches, validation batches), saved to out_dir: the documents split by
    `seed`, a BPE of `vocab` tokens trained on the training part unless `tok` is given (torchrun: by rank 0 alone)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out-dir {out_dir}: cannot create it ({e.strerror}); pick a writable directory") from None
    train_docs, val_docs = split_documents(load_documents(path), seed=seed)
    for part, docs in (("training", train_docs), ("validation", val_docs)):  # (refused before a tokenizer is trained)
        if (n_bytes := sum(len(d.encode("utf-8", "surrogatepass")) + 1 for d in docs)) < seq_len:  # tokens <= bytes
            raise DataError(f"{path or 'the corpus'}: its {part} part holds {n_bytes} bytes, less than one block of "
                            f"--seq-len {seq_len} tokens; pass more text (or a smaller --seq-len)")
    fresh = tok is None and rank == 0
    if fresh:
        print(f"training a {vocab}-token BPE on {sum(map(len, train_docs)) / 1e6:.1f} MB ...", flush=True)
        tok = Tokenizer.train(train_docs, vocab_size=vocab)
    elif tok is None:  # torchrun: rank 0 trained and saved it before the others got here
        tok = load_tokenizer(out_dir)
    if rank == 0:
        tok.save(out_dir)
    streams = [encode_documents(d, tok, os.path.join(out_dir, f"{name}_tokens.npz"))
               for name, d in (("train", train_docs), ("val", val_docs))]
    train_b, val_b = (Batches(stream, tok, seq_len, size, name)
                      for stream, size, name in zip(streams, batch_sizes, ("train", "validation")))
    if fresh and tok.vocab_size < vocab:
        print(f"warning: --vocab {vocab}: this corpus has no pairs left to merge after {tok.vocab_size} tokens; "
              f"the model uses {tok.vocab_size}", file=sys.stderr)
    return tok, train_b, val_b
