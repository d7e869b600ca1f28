"""
Inference for the lab at base size on a CPU: the probe's features, evaluation in fine-tuning, fill. Three things make
it fast: batches of examples of alike length, so that padding stays small; bf16 autocast where the device has native
bf16 (as pre-training uses it); and the probe's features cached per (weights, texts), so that a second probe of the
same model reads them back in seconds.
"""

import hashlib
import json
import os
import time

import torch
from tqdm import tqdm

import data
import mpnext
import train
from lab import tasks

MAX_TOKENS = 8192  # padded tokens per inference batch (rows x longest row)
CACHE_BYTES = 2 << 30  # the feature cache keeps its newest files up to this size


def length_batches(lengths, max_tokens=MAX_TOKENS):
    """Index lists, longest rows first, each within max_tokens padded tokens: sorted by length, a batch pads little.
    Longest first: the largest batch comes first, so a run out of memory fails at once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = []
    for i in order:
        if not batches or (len(batches[-1]) + 1) * lengths[batches[-1][0]] > max_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches


def grouped_epoch(lengths, batch_size, generator, window=50):
    """One shuffled epoch in batches of batch_size examples of alike length (as HF Trainer's group_by_length): shuffle,
    sort each window of `window` batches by length, cut it into batches, shuffle the batches. The gradient sees the
    same batch size; only which examples share a batch is less random than in a plain shuffle."""
    perm, batches = torch.randperm(len(lengths), generator=generator).tolist(), []
    for s in range(0, len(perm), window * batch_size):
        chunk = sorted(perm[s:s + window * batch_size], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def padded(rows, idx, pad_id, device):
    """(input_ids, attention_mask) of rows[idx], padded to the longest, on device."""
    ids = tasks.pad_rows([rows[i] for i in idx], pad_id)
    return ids.to(device), (ids != pad_id).long().to(device)


@torch.no_grad()
def run_batches(fn, rows, pad_id, device, autocast, desc=None):
    """fn(input_ids, attention_mask) -> (B, ...) over length-grouped batches of rows, float32 on the CPU, in the order
    of rows. desc: a progress bar (counting tokens) under that name; without a terminal, a line every 20 s."""
    out, batches, t_print, done = [None] * len(rows), length_batches([len(r) for r in rows]), time.time(), 0
    bar = tqdm(total=sum(map(len, rows)), desc=desc, unit="tok", unit_scale=True, disable=None if desc else True,
               leave=False)
    for idx in batches:
        with autocast:
            y = fn(*padded(rows, idx, pad_id, device)).float().cpu()
        for i, row in zip(idx, y):
            out[i] = row
        bar.update(sum(len(rows[i]) for i in idx))
        done += len(idx)
        if desc and bar.disable and time.time() - t_print >= train.PLAIN_EVERY:
            t_print = time.time()
            print(f"{desc}: {done}/{len(rows)} examples", flush=True)
    bar.close()
    return torch.stack(out)


def mean_features(model, rows, device, autocast, desc=None):
    """The probe's features: the last layer mean-pooled over tokens (SentEval), (n, D) float32."""
    model.eval()
    return run_batches(lambda ids, mask: mpnext.pool(model.encode(ids, mask), mask, "mean"), rows, model.cfg.pad_id,
                       device, autocast, desc)


def weights_digest(model):
    """A digest of every weight's bytes: the same digest means the same model, whatever its path or name."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cached_features(model, split_rows, device, dtype, cache=True):
    """{split: mean_features} for {split: rows}, read from the cache when these weights met these texts in this
    precision on this kind of device before. Returns (features, seconds of extraction or None when read back)."""
    autocast = train.autocast_for(device, dtype)
    path = None
    if cache:  # (the digest reads every weight: only when the cache is used)
        key = hashlib.blake2b(json.dumps([weights_digest(model), split_rows, str(dtype), device]).encode(),
                              digest_size=16).hexdigest()
        path = data._cache_dir() / "features" / f"{key}.pt"
    if path is not None and path.exists():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            os.utime(path)  # recently used: kept longest
            return feats, None
        except Exception:  # a file cut off by a crash: compute again
            pass
    t0 = time.time()
    feats = {s: mean_features(model, rows, device, autocast, f"features {s}") for s, rows in split_rows.items()}
    seconds = time.time() - t0
    if cache:
        data._atomic_write(path, lambda f: torch.save(feats, f))
        files = sorted(path.parent.glob("*.pt"), key=lambda p: -p.stat().st_mtime)
        total = 0
        for p in files:  # the oldest beyond CACHE_BYTES go
            total += p.stat().st_size
            if total > CACHE_BYTES:
                p.unlink(missing_ok=True)
    return feats, seconds
