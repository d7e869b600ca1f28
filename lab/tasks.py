"""
Labelled tasks for fine-tuning and probing: the built-in stdlib task, CSV/TSV files, class directories and
train/dev/test directories, split and deduplicated the same way every time; and their batches of token ids.
"""

import csv
import io
import json
import os
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from data import DataError, _atomic_write, _cache_dir, _read_text, _stdlib_docstrings

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
