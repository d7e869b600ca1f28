"""
Pre-train MPNext on your own text, on CPU or GPU.

    python train.py                                    # offline default: ~5 min on 2 CPU cores, stdlib docstrings
    python train.py --data my_text.txt --max-steps 5000 --preset small --device cuda
    python train.py --data shakespeare --objective mlm # the paper's ablations: mpnet | plm | mlm
    python train.py --rtd --masking span --sbo         # MPNet + ELECTRA's RTD + SpanBERT's spans and SBO, one run
    python train.py --out-dir out --max-steps 2000 --resume   # continue a run exactly where it stopped
    python train.py --benchmark --preset base          # timings side by side: BPE, each objective, HF's MLM step
    torchrun --nproc-per-node 4 train.py --preset base # several GPUs (or CPU processes): --batch-size is global
    python train.py --help                             # every flag, with its default

Every field of MPNextConfig (model + objective) and of TrainConfig below is a flag; --preset picks the model size.
Writes DIR/log.jsonl, DIR/ckpt.pt (atomic) and DIR/tokenizer.json.
"""

import argparse
import contextlib
import csv
import dataclasses
import inspect
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
import mpnext


@dataclass
class TrainConfig:
    data: str = ""  # a .txt file, a directory of .txt files, "shakespeare", or "" for the offline stdlib-docstring corpus
    out_dir: str = "out"  # where log.jsonl, ckpt.pt and tokenizer.json go
    preset: str = "tiny"  # model size: tiny | small | medium | base (flags below override single fields)
    vocab: int = 4096  # BPE vocabulary to train on the corpus (ignored with --resume)
    max_steps: int = 1600  # optimizer steps to run (a resumed run continues up to this)
    schedule_steps: int = 0  # length of the learning-rate plan; 0 = max_steps (set it to stop early and resume)
    batch_size: int = 32  # sequences per optimizer step (split over grad_accum micro-batches)
    grad_accum: int = 1  # micro-batches per step
    seq_len: int = 128  # tokens per sequence (N)
    lr: float = 1.5e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup
    decay: str = "linear"  # after warmup: linear (MPNet) or cosine, to min_lr_ratio * lr
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    optimizer: str = "adamw"  # adamw | radam | ranger | ranger21
    lookahead: bool = False  # wrap the optimizer in Lookahead (k=5, alpha=0.5)
    gc: bool = False  # gradient centralization on every optimizer
    weight_decay: float = 0.01  # decoupled; never on biases, LayerNorms and embeddings
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.98  # Adam beta2 (MPNet / RoBERTa use 0.98)
    eps: float = 1e-6  # Adam epsilon (MPNet: 1e-6)
    grad_clip: float = 1.0  # global gradient-norm clipping; 0 = off
    eval_every: int = 200  # steps between evaluations (and checkpoints)
    save_every: int = 0  # steps between extra checkpoints without an evaluation; 0 = at evaluations only
    eval_batches: int = 20  # validation batches per evaluation
    log_every: int = 10  # steps between log.jsonl rows
    samples: int = 3  # fill-in-the-blank samples printed at each evaluation
    seed: int = 0  # seeds the model init, every batch and every mask draw
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 with bf16 matmuls, else fp16 on CUDA, else fp32) | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the loss (GPU speed knob; costs seconds to minutes at start)
    resume: bool = False  # continue from out_dir/ckpt.pt
    init: str = ""  # start from an MPNext run directory or an HF MPNet checkpoint (directory or hub name): its weights
    #                 and tokenizer, a fresh optimizer; any objective and head
    benchmark: bool = False  # instead of training: time the tokenizer and one training step per objective (and HF's)
    export_hf: str = ""  # at the end, also write a Hugging Face checkpoint with its tokenizer to this directory
    bench_only: str = ""  # --benchmark rows, comma-separated: hf,mlm,plm,mpnet,mlm+rtd,mpnet+rtd,mpnet+span+sbo


# ---------------------------------------------------------------------------------------------------------------------
# command line: every dataclass field becomes a flag


CHOICES = dict(objective=["mpnet", "plm", "mlm"], activation=["gelu", "mish"], decay=["linear", "cosine"],
               rel_init=["local", "normal"], masking=["token", "word", "span"],
               optimizer=["adamw", "radam", "ranger", "ranger21"], device=["auto", "cpu", "cuda", "mps"],
               dtype=["auto", "float32", "bfloat16", "float16"], pooling=["first", "mean"])
NOT_FLAGS = {"vocab_size", "pad_id", "mask_id", "special_ids", "n_classes", "pooling"}  # set by the data or finetune


def field_help(cls):
    """The comment after each field in the class source is its --help text (one source of truth)."""
    src = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", src, flags=re.M))


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # "--pres small" is a typo, not --preset
        # argparse takes "-1e-3" for an option (its pattern knows no exponent): read it as a number, then judge it
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):  # argparse would print the whole usage first: one line says it
        self.exit(2, f"error: {message} (python train.py --help lists every flag)\n")


def add_fields(p, cls, defaults=None):
    """Every field of the dataclass becomes a --flag; only flags actually typed end up in the namespace (SUPPRESS)."""
    group, helps = p.add_argument_group(f"{cls.__name__} fields"), field_help(cls)
    for f in dataclasses.fields(cls):
        if cls is mpnext.MPNextConfig and f.name in NOT_FLAGS:
            continue
        default = (defaults or {}).get(f.name, f.default)
        help_ = f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse formats help with %
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(flag, type=f.type, default=argparse.SUPPRESS, help=help_,
                               choices=CHOICES.get(f.name), metavar=f.name.upper())


def parse_args(argv=None):
    """Returns (train flags, model flags) holding only what the user typed, so --resume can tell them apart."""
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset_arg = OneLineParser(add_help=False)  # --help shows the defaults of the preset in use
    preset_arg.add_argument("--preset", default=TrainConfig.preset)
    add_fields(p, TrainConfig)
    add_fields(p, mpnext.MPNextConfig, mpnext.PRESETS.get(preset_arg.parse_known_args(argv)[0].preset, {}))
    p.add_argument("--whole-word", dest="masking", action="store_const", const="word", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling of --masking word, so old command lines still resume
    given = vars(p.parse_args(argv))
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    return ({k: v for k, v in given.items() if k in train_names},
            {k: v for k, v in given.items() if k not in train_names})


# ---------------------------------------------------------------------------------------------------------------------
# system: device, precision


def pick_device(name):  # (argparse's choices have checked the name)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(d for d, ok in available.items() if ok)
    if not available[name]:
        raise ValueError(f"--device {name}: PyTorch sees no {name} device here; use --device auto or cpu")
    return name


def native_bf16(device):
    """bf16 matmuls in hardware: CUDA with bf16, or a CPU with AVX-512 BF16 or AMX (torch's own, private, probes)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device == "cpu" and any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def pick_dtype(name, device):
    """auto: bf16 autocast where the hardware has bf16 matmuls (on a 2-core AVX-512 BF16 EPYC, the default run ends
    at val_loss 3.88 against fp32's 3.876, its MPNet step 0.55x as long); fp16 + loss scaling on older GPUs; else
    fp32."""
    if name == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device == "cuda" else torch.float32
    if name == "float16" and device != "cuda":
        print(f"warning: --dtype float16 on {device}: made for CUDA GPUs, slow or unsupported here; try auto",
              file=sys.stderr)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _log_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a row cut off by a crash: dropped


def lr_now(optimizer, step):
    group = optimizer.param_groups[0]
    return optimizer.scheduled_lr(group, step) if isinstance(optimizer, mpnext.Ranger21) else group["lr"]


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_for(device, dtype):
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


MAX_BAD_STEPS = 5  # non-finite losses in a row before a run gives up


def update(model, optimizer, scaler, loss, lr, clip):
    """The optimizer step after backward(): set the learning rate, clip the global gradient norm (clip 0: off), and
    step unless the loss or the gradients are not finite (a NaN is skipped; an fp16 overflow is the loss scaler's
    to skip, and it lowers its scale). Returns (stepped, gradients finite)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.unscale_(optimizer)  # true gradients for clipping and the scaler's inf check (no-op without fp16)
    grads_ok = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)))
    stepped = bool(torch.isfinite(loss)) and (grads_ok or scaler.is_enabled())
    if stepped:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stepped, grads_ok


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM during training asks the loop to stop after the current step and save a checkpoint;
    a second one stops at once. Only in the main thread, where Python delivers signals."""

    def __init__(self):
        self.signum, self.t = None, 0.0

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        return self

    def request(self, signum, frame):
        if self.signum is not None and torchrun() and time.time() - self.t < 2:
            return  # one Ctrl-C reaches a torchrun worker twice: from the terminal, and forwarded by torchrun
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum, self.t = signum, time.time()
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                   f"(press Ctrl-C again to stop at once, without saving)")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be restored from here
                signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------------------------
# several processes: torchrun --nproc-per-node N train.py ... (PyTorch's DistributedDataParallel, arXiv 2006.15704)
#
# --batch-size stays the global batch: each optimizer step averages processes x --grad-accum micro-batches, and
# micro-batch slot s (process r, accumulation a: s = r * grad_accum + a) draws from its own generator stream s. So a
# 2-process run and a 1-process run with --grad-accum 2 train on the same batches; stream 0 is the 1-process stream.


def world():
    """(rank, number of processes): torchrun sets RANK and WORLD_SIZE; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def torchrun():
    return "WORLD_SIZE" in os.environ  # even with one process: the same code path, on one GPU or one CPU


def launcher():
    """How this run was started, for the resume hint."""
    return f"torchrun --nproc-per-node {os.environ['LOCAL_WORLD_SIZE']}" if torchrun() else "python"


def stream_seed(seed, slot):
    return seed + slot * 2**32  # slot 0 keeps the plain seed: one process draws what it always drew


def start_processes():
    """Join torchrun's process group: Gloo for CPU tensors, NCCL for CUDA ones; one GPU per process."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if world()[0] > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run; errors (stderr) still show from every rank


class LossOf(torch.nn.Module):
    """DistributedDataParallel averages the gradients of what its forward() computes: here, model.loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def rng_states(gens, device):
    """Every batch stream and dropout RNG state of every process, for an exact resume (a collective under torchrun:
    every process calls it at the same steps)."""
    mine = {"batches": [g.get_state() for g in gens], "torch": [torch.get_rng_state()]}
    if device == "cuda":
        mine["cuda"] = [torch.cuda.get_rng_state()]
    if not dist.is_initialized():
        return mine
    everyone = [None] * world()[1]
    dist.all_gather_object(everyone, mine)
    return {k: [s for r in everyone for s in r[k]] for k in mine}


def check_out_dir(path, flag):
    """An output directory may not be a file, nor a Hugging Face checkpoint (its tokenizer.json would be lost)."""
    if os.path.isfile(path):
        raise ValueError(f"{flag} {path} is a file; name a directory")
    if os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{flag} {path} holds a Hugging Face checkpoint (config.json); pick another directory")


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# evaluation and samples


def is_electra(cfg):
    """Classic ELECTRA: the main model is a discriminator without an LM loss; the generator is the one that fills in."""
    return cfg.objective == "mlm" and cfg.rtd


def mlm_probe(cfg):
    """The shared score: plain BERT-style MLM (token masking, natural order, no extra heads) with the run's
    pred_ratio and 80/10/10 (the defaults unless changed): one task for every objective and head."""
    return dataclasses.replace(cfg, objective="mlm", masking="token", rtd=False, sbo=False)


@torch.no_grad()
def evaluate(model, batches, cfg, tc, device, autocast):
    """Validation metrics of the run's own objective, every head included (val_loss is their weighted sum, val_acc
    the LM accuracy, val_disc_recall, val_sbo_loss, ...), on the first eval_batches blocks with a fixed masking seed,
    so numbers compare across evaluations. Also val_mlm_loss / val_mlm_acc, the plain MLM score of mlm_probe, which
    compares objectives: a PLM- or MPNet-trained model is scored on the same predictions as an MLM one. Classic
    ELECTRA's discriminator has no LM head to score."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    tasks = [("val", cfg)] + ([] if is_electra(cfg) else [("val_mlm", mlm_probe(cfg))])
    sums, counts = {}, {}
    for ids, starts in itertools.islice(batches.iterate(), tc.eval_batches):
        state = g.get_state()
        for name, task_cfg in tasks:
            g.set_state(state)  # the same draws for both scores (the same predicted tokens for token masking)
            batch = mpnext.make_batch(ids, task_cfg, g, starts)
            with autocast:
                _, m = model.loss(to_device(batch, device))
            for k, v in m.items():
                key, v = f"{name}_{k}", v.item()
                if (name == "val" or k in ("loss", "acc")) and not (k == "disc_auc" and math.isnan(v)):  # undefined
                    sums[key], counts[key] = sums.get(key, 0.0) + v, counts.get(key, 0) + 1
    model.train()
    return {k: v / counts[k] for k, v in sums.items()}


@torch.no_grad()
def fill_in_samples(model, tok, batches, cfg, device, n_samples, width=48):
    """Hide ~15% of the words of a few validation snippets and let the model fill them in (natural order); after
    classic ELECTRA, its generator does (the discriminator has no trained LM head)."""
    model.eval()
    lm = model.generator if is_electra(cfg) else model
    lines = []
    for i, (ids, starts) in enumerate(batches.iterate()):
        if i == n_samples:
            break
        ids, starts = ids[:1, :width], starts[:1, :width]
        wcfg = dataclasses.replace(mlm_probe(cfg), masking="word", mask_prob=1.0, random_prob=0.0)
        batch = mpnext.make_batch(ids, wcfg, torch.Generator().manual_seed(i), starts)
        pred = lm(batch["input_ids"].to(device)).argmax(-1).cpu()[0]
        hidden = set(batch["pred_positions"][0].tolist())
        shown = [f"[{tok.decode([int(pred[j])])}|{tok.decode([int(ids[0, j])])}]" if j in hidden
                 else tok.decode([int(ids[0, j])]) for j in range(1, ids.shape[1])]
        lines.append("  " + "".join(shown).replace("\n", " ").strip())
    model.train()
    return "fill-in samples, [prediction|truth]:\n" + "\n".join(lines)


def recipe(cfg):
    """"mpnet", "mpnet+span+sbo", "mlm+rtd", ...: the objective and what is added to it."""
    return "+".join([cfg.objective] + [cfg.masking] * (cfg.masking != "token") + ["rtd"] * cfg.rtd + ["sbo"] * cfg.sbo
                    + ["return_mlm"] * cfg.return_mlm)


def score_line(ev):
    line = f"val_loss {ev['val_loss']:.3f}"  # the weighted sum of the run's losses; then its LM part, if other heads
    if "val_lm_loss" in ev and abs(ev["val_lm_loss"] - ev["val_loss"]) > 1e-9:
        line += f" (lm {ev['val_lm_loss']:.3f})"
    line += f" acc {ev['val_acc']:.3f}" if "val_acc" in ev else ""
    if "val_mlm_loss" in ev:
        line += f" | val_mlm_loss {ev['val_mlm_loss']:.3f} acc {ev['val_mlm_acc']:.3f}"
    if "val_gen_acc" in ev:
        line += " | rtd: gen_acc {:.3f} replaced {:.3f} disc_acc {:.3f} auc {:.3f} P {:.3f} R {:.3f}".format(*(
            ev["val_" + k] for k in ("gen_acc", "replaced", "disc_acc", "disc_auc", "disc_precision", "disc_recall")))
    if "val_sbo_loss" in ev:
        line += f" | sbo_loss {ev['val_sbo_loss']:.3f} acc {ev['val_sbo_acc']:.3f}"
    return line


# ---------------------------------------------------------------------------------------------------------------------
# the run


def setup(argv=None):
    """Everything that can fail because of user input happens here, before any training."""
    train_args, model_args = parse_args(argv)
    if train_args.get("benchmark"):  # its tokenizer and token caches go beside a run's files, never over them
        train_args.update(out_dir=os.path.join(train_args.get("out_dir", TrainConfig.out_dir), "benchmark"),
                          resume=False)
    out_dir = train_args.get("out_dir", TrainConfig.out_dir)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt, init_state = None, None
    check_out_dir(out_dir, "--out-dir")
    if os.path.exists(ckpt_path) and not train_args.get("resume"):
        raise ValueError(f"{out_dir} already holds a run ({ckpt_path}); continue it with --resume, or pick another "
                         f"--out-dir")
    if train_args.get("resume"):
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--resume: {ckpt_path} does not exist; run without --resume first")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            tc = dataclasses.replace(TrainConfig(**ckpt["train_config"]), **train_args)  # typed flags win
            cfg = config_of(ckpt)
            ckpt["rng"] = {k: v if isinstance(v, list) else [v] for k, v in ckpt["rng"].items()}  # tensors: 1 stream
        except Exception as e:  # corrupt file, or a checkpoint of another program / version
            raise ValueError(f"{ckpt_path}: not a checkpoint this train.py can resume ({type(e).__name__}); "
                             f"use another --out-dir or delete it") from None
        if tc.preset != ckpt["train_config"]["preset"]:  # (tc holds the typed flags already)
            raise ValueError(f"--resume keeps the checkpoint's model (preset {ckpt['train_config']['preset']}); "
                             f"drop --preset or use another --out-dir")
        n_streams = len(ckpt["rng"]["batches"])  # per process and micro-batch slot (train() says why)
        if n_streams != world()[1] * tc.grad_accum:
            raise ValueError(f"--resume: {ckpt_path} was written by {n_streams} batch stream(s) (processes x "
                             f"--grad-accum), this run has {world()[1]} x {tc.grad_accum}; resume with {n_streams} "
                             f"in all "
                             f"(in one process: --grad-accum {n_streams}, which draws the same batches)")
        if tc.max_steps <= ckpt["step"]:
            raise ValueError(f"--resume: {ckpt_path} is at step {ckpt['step']} already; pass a larger --max-steps")
        changed = sorted(k for k, v in model_args.items() if getattr(cfg, k) != v)
        if changed:  # the same command line plus --resume is fine; a different model is not
            raise ValueError(f"--resume keeps the model/objective of the checkpoint; drop or fix {changed}")
        tok = data.load_tokenizer(out_dir)
    else:
        tc = TrainConfig(**train_args)
        tok = None
        if tc.init:  # the checkpoint fixes the architecture and the vocabulary; the objective and heads are free
            cfg, init_state, tok = load_init(tc.init)
            clash = sorted(k for k, v in model_args.items() if k in ARCH_FIELDS and getattr(cfg, k) != v)
            clash += [f for f in ("preset", "vocab") if f in train_args]
            if clash:
                raise ValueError(f"--init {tc.init} fixes the model size and vocabulary; drop {clash}")
            cfg = dataclasses.replace(cfg, **model_args)
        else:
            cfg = preset_config(tc, model_args)
    check_run(tc, cfg)  # fail fast, before any data work
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir}: cannot create it ({e.strerror}); pick a writable directory") from None
    device = pick_device(tc.device)
    if torchrun() and device == "mps":
        raise ValueError("torchrun: --device mps cannot join a process group; use cpu or cuda")
    docs = data.load_documents(tc.data or None)
    train_docs, val_docs = data.split_documents(docs, seed=tc.seed)
    if tok is None:
        if world()[0] > 0:  # torchrun: rank 0 trained it and wrote it (and the token caches) before we got here
            tok = data.load_tokenizer(out_dir)
        else:
            print(f"training a {tc.vocab}-token BPE on {sum(map(len, train_docs)) / 1e6:.1f} MB ...", flush=True)
            tok = data.Tokenizer.train(train_docs, vocab_size=tc.vocab)
        cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size, pad_id=tok.pad_id, mask_id=tok.mask_id,
                                  special_ids=tok.special_ids)
    if world()[0] == 0:
        tok.save(out_dir)
    streams = [data.encode_documents(d, tok, os.path.join(out_dir, f"{name}_tokens.npz"))
               for name, d in (("train", train_docs), ("val", val_docs))]
    train_b = data.Batches(streams[0], tok, tc.seq_len, tc.batch_size // (tc.grad_accum * world()[1]), "train")
    val_b = data.Batches(streams[1], tok, tc.seq_len, tc.batch_size, "validation")
    if tok.vocab_size < tc.vocab and not (ckpt or tc.init):
        print(f"warning: --vocab {tc.vocab}: this corpus has no pairs left to merge after {tok.vocab_size} tokens; "
              f"the model uses {tok.vocab_size}", file=sys.stderr)
    make_optimizer(mpnext.MPNext(cfg), tc)  # config errors (unknown activation, optimizer, ...) surface here
    return tc, cfg, tok, device, train_b, val_b, ckpt, init_state


def preset_config(tc, model_args):
    """A new model: the preset, long enough for --seq-len, with the model flags on top."""
    preset = mpnext.MPNextConfig.from_preset(tc.preset)
    return dataclasses.replace(preset, **{"max_len": max(preset.max_len, tc.seq_len), **model_args})


ARCH_FIELDS = {"vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_len", "d_embed", "pre_ln", "activation",
               "rel_buckets", "rel_max_distance", "layer_norm_eps"}  # what an --init checkpoint decides


def load_init(path):
    """--init: (config, weights, tokenizer) of an MPNext run directory, or of a Hugging Face MPNet checkpoint
    (a directory or a hub name) with its own tokenizer."""
    if os.path.exists(os.path.join(path, "ckpt.pt")):
        ckpt, cfg = read_run(path)
        return dataclasses.replace(cfg, n_classes=0), ckpt["model"], data.load_tokenizer(path)
    tok = data.HFTokenizer(path)
    try:
        model = mpnext.MPNext.from_hf(path, mask_id=tok.mask_id)
    except Exception as e:
        raise ValueError(f"--init {path}: not an MPNet checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                         ) from None
    if model.cfg.vocab_size != tok.vocab_size or model.cfg.pad_id != tok.pad_id:
        raise ValueError(f"--init {path}: its tokenizer ({tok.vocab_size} tokens, pad {tok.pad_id}) does not fit its "
                         f"model ({model.cfg.vocab_size}, pad {model.cfg.pad_id})")
    return dataclasses.replace(model.cfg, special_ids=tok.special_ids), model.state_dict(), tok


AT_LEAST_1, NOT_NEGATIVE, POSITIVE = (lambda v: v >= 1, "at least 1"), (lambda v: v >= 0, "0 or more"), (
    lambda v: v > 0, "positive")


def check_ranges(config, rules):
    """rules {field: (test, what the value must be)}: a ValueError for the first flag that fails (NaN fails all)."""
    for name, (ok, want) in rules.items():
        if not ok(getattr(config, name)):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be {want}")


def check_run(tc, cfg):
    """The flag checks that need no data: one ValueError each."""
    mpnext.check_config(cfg)
    check_ranges(tc, {**dict.fromkeys(("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every",
                                       "eval_batches", "log_every"), AT_LEAST_1),
                      **dict.fromkeys(("warmup_steps", "samples", "weight_decay"), NOT_NEGATIVE),
                      "save_every": (NOT_NEGATIVE[0], "0 (at evaluations only) or positive"),
                      "schedule_steps": (NOT_NEGATIVE[0], "0 (= --max-steps) or positive"),
                      "grad_clip": (NOT_NEGATIVE[0], "0 (off) or a positive norm"), "eps": POSITIVE,
                      "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
                      "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1], a fraction of --lr")})
    if tc.seq_len > cfg.max_len:
        raise ValueError(f"--seq-len {tc.seq_len} exceeds the model's max_len {cfg.max_len}")
    if tc.vocab < len(data.SPECIAL_TOKENS) + 256:  # the BPE starts from the specials and the 256 bytes
        raise ValueError(f"--vocab {tc.vocab}: a byte-level BPE needs at least {len(data.SPECIAL_TOKENS) + 256}")
    if not (math.isfinite(tc.lr) and 0 < tc.lr < 1):
        raise ValueError(f"--lr {tc.lr}: use a positive learning rate below 1 (the default is 1.5e-3)")
    if round(cfg.pred_ratio * tc.seq_len) < 1:
        raise ValueError(f"--pred-ratio {cfg.pred_ratio} x --seq-len {tc.seq_len} predicts no token; raise either")
    if cfg.rtd and cfg.objective != "mlm" and mpnext.replaced_count(cfg, tc.seq_len) < 1:
        raise ValueError(f"--rtd-ratio {cfg.rtd_ratio} x --seq-len {tc.seq_len} replaces no token; raise either")
    unknown = set(tc.bench_only.split(",")) - set(BENCH_ROWS) if tc.bench_only else set()
    if unknown:
        raise ValueError(f"--bench-only {tc.bench_only}: unknown row(s) {sorted(unknown)}; pick from "
                         f"{','.join(BENCH_ROWS)}")
    if tc.export_hf:
        mpnext.check_hf_exportable(cfg)
        check_export_dir(tc.out_dir, tc.export_hf)
    if tc.batch_size % (tc.grad_accum * world()[1]):
        raise ValueError(f"--batch-size {tc.batch_size} must be a multiple of --grad-accum {tc.grad_accum}"
                         + f" x {world()[1]} processes" * (world()[1] > 1))
    if tc.schedule_steps and tc.max_steps > tc.schedule_steps and tc.min_lr_ratio == 0 and tc.optimizer != "ranger21":
        raise ValueError(f"--max-steps {tc.max_steps} runs past --schedule-steps {tc.schedule_steps}, where the "
                         f"learning rate is 0; raise --schedule-steps (or set --min-lr-ratio)")
    if tc.warmup_steps >= (tc.schedule_steps or tc.max_steps):
        print(f"warning: --warmup-steps {tc.warmup_steps} covers the whole {tc.schedule_steps or tc.max_steps}-step "
              f"plan: the learning rate never leaves warmup", file=sys.stderr)


def make_optimizer(model, tc):
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    outputs = [n for n in ("tok_emb", "head_bias", "generator.head_bias", "disc.out", "sbo.bias") if n in names]
    return mpnext.build_optimizer(model, tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay,
                                  betas=(tc.beta1, tc.beta2), eps=tc.eps, lookahead=tc.lookahead, gc=tc.gc,
                                  num_iterations=tc.schedule_steps or tc.max_steps, output_layer_names=outputs)


def train(tc, cfg, tok, device, train_b, val_b, ckpt=None, init_state=None):
    torch.manual_seed(tc.seed)
    model = mpnext.MPNext(cfg).to(device)
    if init_state is not None and ckpt is None:  # --init: its encoder; heads it lacks (or of another size) start fresh
        own = model.state_dict()
        init_state = {k: v for k, v in init_state.items() if k in own and own[k].shape == v.shape}
        missing, _ = model.load_state_dict(init_state, strict=False)
        assert all(k.startswith(("generator.", "disc.", "sbo.", "head_")) for k in missing), missing
    schedule_steps = tc.schedule_steps or tc.max_steps
    optimizer = make_optimizer(model, tc)
    dtype = pick_dtype(tc.dtype, device)
    autocast = autocast_for(device, dtype)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    rank, n_proc = world()
    slots = range(rank * tc.grad_accum, (rank + 1) * tc.grad_accum)  # this process's micro-batch slots
    gens = [torch.Generator().manual_seed(stream_seed(tc.seed, s)) for s in slots]  # every batch and mask draw
    torch.manual_seed(stream_seed(tc.seed, rank))  # dropout: the same weights everywhere, other masks per process
    step, best = 0, math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the run that saved it had no fp16 scaler
            scaler.load_state_dict(ckpt["scaler"])
        step, best = ckpt["step"], ckpt["best_val"]
        rng = ckpt["rng"]
        for s, g in zip(slots, gens):
            g.set_state(rng["batches"][s])
        torch.set_rng_state(rng["torch"][rank])  # dropout
        if device == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"][rank])
    net = model.loss
    if torchrun():  # ELECTRA's discriminator leaves its LM head out of the loss: DDP must look for unused parameters
        net = ddp = torch.nn.parallel.DistributedDataParallel(
            LossOf(model), device_ids=[torch.cuda.current_device()] if device == "cuda" else None,
            find_unused_parameters=is_electra(cfg))
    loss_fn = torch.compile(net) if tc.compile else net
    log_path, kept = os.path.join(tc.out_dir, "log.jsonl"), []
    if ckpt is not None and os.path.exists(log_path):  # resume: keep the rows up to the checkpoint, drop the rest
        kept = [line for line in open(log_path) if _log_step(line) <= step]
    log = open(log_path if rank == 0 else os.devnull, "w", buffering=1)  # line by line; only rank 0 logs
    log.writelines(kept)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("generator.", "disc.", "sbo.")))
    extra = f" (+{(model.num_params() - n_params) / 1e6:.2f}M generator/heads)" if n_params < model.num_params() else ""
    print(f"MPNext {recipe(cfg)} | {n_params / 1e6:.2f}M params{extra} | {device} {str(dtype).split('.')[-1]} | "
          f"{len(train_b.stream) / 1e6:.2f}M train tokens | steps {step}->{tc.max_steps}", flush=True)

    def checkpoint(rng):
        """Save everything for an exact resume; never weights that are not finite (the last good file stays)."""
        if rank > 0:
            return True
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            tqdm.write(f"step {step}: the weights are not finite; {tc.out_dir}/ckpt.pt is not overwritten")
            return False
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "model_config": dataclasses.asdict(cfg), "train_config": dataclasses.asdict(tc), "step": step,
                     "best_val": best, "rng": rng}, os.path.join(tc.out_dir, "ckpt.pt"))
        return True

    t0, tokens, t_last, tok_last = time.time(), 0, time.time(), 0
    metrics, ev, bad_steps, overflows = {}, {}, 0, 0
    bar = tqdm(total=tc.max_steps, initial=step, dynamic_ncols=True, disable=None if rank == 0 else True)
    model.train()
    stopping = False
    with GracefulStop() as stop:  # Ctrl-C: finish the step, then save below
        while step < tc.max_steps and not stopping:
            step_loss = 0.0
            for a, gen in enumerate(gens):
                ids, starts = train_b.sample(gen)
                batch = mpnext.make_batch(ids, cfg, gen, starts)
                # torchrun: average the gradients over processes once, after the last micro-batch
                with ddp.no_sync() if torchrun() and a < len(gens) - 1 else contextlib.nullcontext(), autocast:
                    loss, metrics = loss_fn(to_device(batch, device))
                scaler.scale(loss / tc.grad_accum).backward()
                step_loss += loss.detach() / tc.grad_accum
                tokens += ids.numel() * n_proc
            stopping = stop.signum is not None
            if torchrun():  # every process must skip, log and stop at the same steps: agree on the loss and on stopping
                agreed = torch.stack([step_loss.float(), torch.tensor(float(stopping), device=step_loss.device)])
                dist.all_reduce(agreed)
                step_loss, stopping = agreed[0] / n_proc, bool(agreed[1] > 0)
            mult = 1.0 if tc.optimizer == "ranger21" else mpnext.lr_multiplier(  # Ranger21 runs its own warmup/warmdown
                step, tc.warmup_steps, schedule_steps, tc.decay, tc.min_lr_ratio)
            stepped, grads_ok = update(model, optimizer, scaler, step_loss, tc.lr * mult, tc.grad_clip)
            if stepped:
                bad_steps, overflows = 0, 0 if grads_ok else overflows + 1
                if not grads_ok:
                    tqdm.write(f"step {step + 1}: fp16 gradient overflow; the loss scaler skipped this update")
                    if overflows >= 6 * MAX_BAD_STEPS:  # the scale has halved 30 times: the gradients are bad
                        bad_steps = overflows
            else:  # never step on a NaN: skip the update, keep going, stop if it persists
                bad_steps += 1
                tqdm.write(f"step {step + 1}: the loss or the gradients are not finite; update skipped "
                           f"({bad_steps} in a row, the run stops at {MAX_BAD_STEPS})")
            step += 1
            if bad_steps >= MAX_BAD_STEPS:
                break
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                now = time.time()
                tok_s = (tokens - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens
                row = {"step": step, **{k: v.item() for k, v in metrics.items()}, "loss": step_loss.item(),
                       "lr": lr_now(optimizer, step), "tok_s": round(tok_s)}  # torchrun: metrics are rank 0's
                log.write(json.dumps(row) + "\n")
                heads = {k: f"{row[k]:.2f}" for k in ("gen_acc", "disc_auc", "disc_recall", "sbo_loss") if k in row}
                bar.set_postfix(loss=f"{row['loss']:.3f}", **heads, lr=f"{row['lr']:.2e}", tok_s=f"{tok_s / 1e3:.1f}k")
            if step % tc.eval_every == 0 or step == tc.max_steps:
                rng = rng_states(gens, device)  # every process takes part; then rank 0 evaluates and saves
                if rank > 0:
                    continue
                with mpnext.SlowWeights(optimizer):  # Lookahead: evaluate the slow weights phi (then the fast again)
                    ev = evaluate(model, val_b, cfg, tc, device, autocast)
                best = min(best, ev["val_loss"])
                log.write(json.dumps({"step": step, "loss": step_loss.item(), **ev}) + "\n")
                tqdm.write(f"step {step}: {score_line(ev)}")
                if not math.isfinite(ev["val_loss"]):  # a poisoned model never overwrites the last good checkpoint
                    tqdm.write(f"step {step}: validation loss is not finite; {tc.out_dir}/ckpt.pt is not overwritten")
                    continue
                if tc.samples:
                    tqdm.write(fill_in_samples(model, tok, val_b, cfg, device, tc.samples))
                checkpoint(rng)
            elif tc.save_every and step % tc.save_every == 0 and bad_steps == 0:  # never right after a NaN
                checkpoint(rng_states(gens, device))
    bar.close()
    log.close()
    if bad_steps >= MAX_BAD_STEPS:
        print(f"error: the loss or the gradients were not finite for {bad_steps} steps in a row (up to step {step}); "
              f"the last good checkpoint, {tc.out_dir}/ckpt.pt, is untouched. Lower --lr, or try --dtype float32",
              file=sys.stderr)
        return model, ev, 1
    if stopping and step < tc.max_steps:
        saved = bad_steps == 0 and checkpoint(rng_states(gens, device))
        print(f"stopped at step {step} of {tc.max_steps}; {tc.out_dir}/ckpt.pt holds step "
              f"{step if saved else 'of the last good checkpoint'}. Continue with:\n"
              f"  {launcher()} train.py --out-dir {tc.out_dir} --resume", flush=True)
        return model, ev, 128 + (stop.signum or signal.SIGTERM)  # the shell's status for a process ended by it
    minutes = (time.time() - t0) / 60
    if ev:
        print(f"summary | {recipe(cfg)} | params {n_params / 1e6:.2f}M | {device} | {minutes:.1f} min | "
              f"{tokens / max(minutes * 60, 1e-9) / 1e3:.1f}k tok/s | {score_line(ev)}")
    return model, ev, 0 if math.isfinite(ev.get("val_loss", 0.0)) else 1


# ---------------------------------------------------------------------------------------------------------------------
# fine-tuning and probing: python train.py finetune [--init RUN_DIR] [--data TASK] [--probe]


@dataclass
class FinetuneConfig:
    init: str = ""  # a pre-training --out-dir (its model and tokenizer); "" = random init, BPE trained on the task
    random_init: bool = False  # with --init: its architecture and tokenizer, fresh weights (pre-training's baseline)
    data: str = ""  # CSV/TSV file, directory of class files, or of train/dev/test files; "" = built-in stdlib task
    out_dir: str = "out-finetune"  # where log.jsonl, ckpt.pt (best validation model) and tokenizer.json go
    label_col: str = "label"  # CSV/TSV: the label column
    text_cols: str = ""  # CSV/TSV: one or two text columns, comma-separated; "" = every column but the label
    train_size: int = 0  # keep this many training examples (stratified), for low-resource runs; 0 = all
    split_seed: int = 0  # seeds the train/dev/test split of a single file (fixed across --seed on purpose)
    probe: bool = False  # frozen encoder, mean-pooled features, logistic regression picked on dev (SentEval)
    folds: int = 10  # --probe on a task given as one pool (MR, SUBJ): K-fold cross-validation, as SentEval; 0 = split
    pooling: str = "first"  # classifier input: the <s> row (MPNet) or the mean over tokens
    epochs: int = 10  # at most this many passes over the training set
    patience: int = 3  # early stopping: epochs without a better validation accuracy
    batch_size: int = 32  # examples per step
    max_len: int = 128  # tokens per example, <s> and </s> included (longer texts are cut at the end)
    lr: float = 0.0  # peak learning rate, warmup 6% of the steps then linear decay; 0 = 2e-5 x (768 / d_model)^2
    weight_decay: float = 0.01  # decoupled; never on biases, LayerNorms and embeddings
    dropout: float = 0.1  # fine-tuning dropout (hidden, attention, classifier), also after a run pre-trained without
    preset: str = "tiny"  # random init only: the model size
    vocab: int = 4096  # random init only: BPE vocabulary trained on the task's training texts
    seed: int = 0  # seeds the init of new weights, the batch order and dropout
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # as for pre-training
    compile: bool = False  # torch.compile the loss


def finetune_flags(argv, prog="train.py finetune"):
    """FinetuneConfig from a command line, and the flags given; every check that needs no data."""
    p = OneLineParser(prog=prog, description="Fine-tune or probe a model on a classification task.")
    add_fields(p, FinetuneConfig)
    typed = vars(p.parse_args(argv))  # only the flags given (add_fields: SUPPRESS)
    fc = FinetuneConfig(**typed)
    check_ranges(fc, {**dict.fromkeys(("epochs", "patience", "batch_size"), AT_LEAST_1),
                      "lr": (lambda v: 0 <= v < 1, "in [0, 1) (0 = auto)"), "weight_decay": NOT_NEGATIVE,
                      "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
                      "train_size": (NOT_NEGATIVE[0], "0 (all) or more"),
                      "max_len": (lambda v: v >= 8, "at least 8"),
                      "folds": (lambda v: v == 0 or 3 <= v <= 100, "0 (the train/dev/test split) or 3 to 100")})
    if fc.random_init and not fc.init:
        raise ValueError("--random-init takes the model and tokenizer of --init DIR; pass --init too")
    if fc.init and typed.keys() & {"preset", "vocab"}:
        raise ValueError(f"--init {fc.init} fixes the model and the vocabulary; drop "
                         f"{sorted('--' + k for k in typed.keys() & {'preset', 'vocab'})}")
    if fc.probe and "pooling" in typed:
        raise ValueError("--probe always mean-pools the last layer (SentEval); drop --pooling")
    return fc, typed


def finetune_setup(argv):
    """Flags, checks, task, tokenizer and model, before any training: (fc, cfg, model, tok, task)."""
    fc, typed = finetune_flags(argv)
    check_out_dir(fc.out_dir, "--out-dir")
    if os.path.exists(os.path.join(fc.out_dir, "ckpt.pt")):
        raise ValueError(f"{fc.out_dir} already holds a fine-tuned model; pick another --out-dir or delete it")
    task = data.load_task(fc.data or None, fc.split_seed, fc.train_size, fc.label_col, fc.text_cols)
    state = None
    if fc.init:  # a pre-training (or fine-tuning) run directory, or a Hugging Face MPNet checkpoint
        cfg, state, tok = load_init(fc.init)
        state = None if fc.random_init else {k: v for k, v in state.items() if not k.startswith("classifier.")}
    else:
        print(f"random init: training a {fc.vocab}-token BPE on the task's training texts ...", flush=True)
        tok = data.Tokenizer.train([" ".join(t) for t in task.splits["train"][0]], vocab_size=fc.vocab)
        cfg = dataclasses.replace(mpnext.MPNextConfig.from_preset(fc.preset), vocab_size=tok.vocab_size,
                                  pad_id=tok.pad_id, mask_id=tok.mask_id, special_ids=tok.special_ids)
    if fc.max_len > cfg.max_len:
        raise ValueError(f"--max-len {fc.max_len} exceeds the model's max_len {cfg.max_len}")
    # the encoder alone plus a new head: pre-training heads (generator, discriminator, SBO) are left behind
    cfg = dataclasses.replace(cfg, n_classes=len(task.labels), pooling=fc.pooling, dropout=fc.dropout,
                              attn_dropout=fc.dropout, rtd=False, sbo=False)
    if not fc.lr:  # MPNet's GLUE range (1e-5 to 3e-5) for base, more for narrower models (7e-4 for tiny)
        fc = dataclasses.replace(fc, lr=min(1e-3, 2e-5 * (768 / cfg.d_model) ** 2))
    torch.manual_seed(fc.seed)
    model = mpnext.MPNext(cfg)
    if state is not None:
        try:
            missing, _ = model.load_state_dict(state, strict=False)  # unexpected keys: the pre-training heads
        except RuntimeError as e:
            raise ValueError(f"--init {fc.init}: weights do not fit the model ({str(e).splitlines()[-1].strip()})")
        if any(not k.startswith("classifier.") for k in missing):
            raise ValueError(f"--init {fc.init}: the checkpoint lacks encoder weights {missing[:3]}")
    os.makedirs(fc.out_dir, exist_ok=True)
    tok.save(fc.out_dir)
    return fc, cfg, model, tok, task


def source(fc):
    return f"random init ({fc.init}'s model)" if fc.random_init else fc.init or "random init"


def finetune(argv=None):
    """Fine-tune (or probe) and report test accuracy and macro-F1 of the best validation epoch. Returns (results,
    exit status)."""
    fc, cfg, model, tok, task = finetune_setup(argv)
    device = pick_device(fc.device)
    dtype = pick_dtype(fc.dtype, device)
    autocast, model = autocast_for(device, dtype), model.to(device)
    rows = {s: data.encode_examples(t, tok, fc.max_len) for s, (t, _) in task.splits.items()}
    labels = {s: torch.tensor(y) for s, (_, y) in task.splits.items()}
    n = {s: len(v) for s, v in rows.items()}
    folds = fc.folds if fc.probe and task.pooled and not fc.train_size else 0  # a given split is kept as given
    protocol = f"probe, {folds}-fold CV" if folds else "probe" if fc.probe else "finetune"
    print(f"{task.name}: {len(task.labels)} classes | train {n['train']} dev {n['dev']} test {n['test']} | "
          f"{protocol} | {source(fc)} | {device} {'float32' if fc.probe else str(dtype).split('.')[-1]}", flush=True)

    def batches(split, order=None):
        order = range(n[split]) if order is None else order
        for i in range(0, n[split], fc.batch_size):
            idx = list(order[i:i + fc.batch_size])
            ids = data.pad_rows([rows[split][j] for j in idx], tok.pad_id)
            yield to_device({"kind": "cls", "input_ids": ids, "attention_mask": (ids != tok.pad_id).long(),
                             "labels": labels[split][idx]}, device)

    @torch.no_grad()
    def predict(split):
        model.eval()
        out = []
        for b in batches(split):
            with autocast:
                out.append(model.classify(b["input_ids"], b["attention_mask"]).float().argmax(-1).cpu())
        model.train()
        return torch.cat(out)

    t0, log, status = time.time(), open(os.path.join(fc.out_dir, "log.jsonl"), "w", buffering=1), 0
    if fc.probe:
        model.eval()
        feats = {}
        with torch.no_grad():
            for s in data.SPLITS:  # in fp32 whatever --dtype says: the features are computed once, cheaply
                feats[s] = torch.cat([mpnext.pool(model.encode(b["input_ids"], b["attention_mask"]),
                                                  b["attention_mask"], "mean").cpu() for b in batches(s)])
        if folds:  # all examples, each scored once
            res = mpnext.probe_cv(torch.cat(list(feats.values())), torch.cat(list(labels.values())),
                                  len(task.labels), folds, fc.split_seed)
        else:
            res = mpnext.probe(feats, labels, len(task.labels))
        res.pop("pred"), res.pop("fold", None)
    else:  # epochs with early stopping on dev accuracy; the best epoch's weights are saved and scored on test
        total = fc.epochs * math.ceil(n["train"] / fc.batch_size)
        optimizer = mpnext.build_optimizer(model, "adamw", lr=fc.lr, weight_decay=fc.weight_decay, betas=(0.9, 0.98),
                                           eps=1e-6)
        scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
        loss_fn = torch.compile(model.loss) if fc.compile else model.loss
        gen = torch.Generator().manual_seed(fc.seed)
        step, best, best_epoch, bad = 0, -1.0, 0, 0
        bar = tqdm(total=total, dynamic_ncols=True, disable=None)
        with GracefulStop() as stop:
            for epoch in range(1, fc.epochs + 1):
                for batch in batches("train", torch.randperm(n["train"], generator=gen).tolist()):
                    with autocast:
                        loss, metrics = loss_fn(batch)
                    scaler.scale(loss).backward()
                    lr = fc.lr * mpnext.lr_multiplier(step, round(0.06 * total), total)
                    bad = 0 if update(model, optimizer, scaler, loss, lr, 1.0)[0] else bad + 1
                    if bad:  # never step on a NaN; give up when it persists
                        tqdm.write(f"step {step + 1}: the loss or the gradients are not finite; update skipped")
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
                    if stop.signum is not None or bad >= MAX_BAD_STEPS:
                        break
                dev_acc = (predict("dev") == labels["dev"]).float().mean().item()
                log.write(json.dumps({"epoch": epoch, "step": step, "loss": loss.item(), "dev_acc": dev_acc}) + "\n")
                best_mark = " (best)" * (dev_acc > best)
                tqdm.write(f"epoch {epoch}: loss {loss.item():.3f} dev_acc {dev_acc:.4f}{best_mark}")
                if dev_acc > best:
                    best, best_epoch = dev_acc, epoch
                    save_atomic({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
                                 "finetune_config": dataclasses.asdict(fc), "epoch": epoch, "dev_acc": dev_acc,
                                 "labels": task.labels}, os.path.join(fc.out_dir, "ckpt.pt"))
                if bad >= MAX_BAD_STEPS:
                    print(f"error: the loss or the gradients were not finite for {bad} steps in a row; scoring the "
                          f"best epoch so far ({best_epoch}). Lower --lr, or try --dtype float32", file=sys.stderr)
                    status = 1
                    break
                if stop.signum is not None:
                    print(f"stopped in epoch {epoch}; scoring the best epoch so far ({best_epoch})", flush=True)
                    status = 128 + stop.signum
                    break
                if epoch - best_epoch >= fc.patience:
                    break
        bar.close()
        model.load_state_dict(torch.load(os.path.join(fc.out_dir, "ckpt.pt"), weights_only=True)["model"])
        pred = predict("test")
        res = {"dev_acc": best, "test_acc": (pred == labels["test"]).float().mean().item(),
               "test_f1": mpnext.macro_f1(pred, labels["test"], cfg.n_classes), "best_epoch": best_epoch}
    res.update(task=task.name, protocol=protocol, n_train=n["train"], minutes=(time.time() - t0) / 60)
    log.write(json.dumps(res) + "\n")
    log.close()
    print(f"summary | {task.name} | {res['protocol']} | {source(fc)} | test_acc {res['test_acc']:.4f} "
          f"test_f1 {res['test_f1']:.4f} | dev_acc {res['dev_acc']:.4f} | {res['minutes']:.1f} min")
    return res, status


# ---------------------------------------------------------------------------------------------------------------------
# use a trained model: train.load_run(DIR) in Python, python train.py fill --init DIR "text with <mask>"


def config_of(ckpt):
    model_config = dict(ckpt["model_config"])
    if "whole_word" in model_config:  # saved before --masking replaced --whole-word
        model_config["masking"] = "word" if model_config.pop("whole_word") else "token"
    return mpnext.MPNextConfig(**model_config)


def read_run(run_dir):
    """(checkpoint dict on the CPU, loaded with weights_only, and its MPNextConfig) of a run directory, or one
    ValueError."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir}: no ckpt.pt there; pass the --out-dir of a pre-training or fine-tuning run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return ckpt, config_of(ckpt)
    except Exception as e:
        raise ValueError(f"{path}: not an MPNext checkpoint ({type(e).__name__})") from None


def load_run(out_dir, device="cpu"):
    """(model in eval mode, tokenizer) of a pre-training or fine-tuning --out-dir: the one call that uses a run.
        model, tok = train.load_run("out")
        logits = model(torch.tensor([[tok.bos_id] + tok.encode("the <mask> sat", specials=True) + [tok.eos_id]]))"""
    ckpt, cfg = read_run(out_dir)
    model = mpnext.MPNext(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), data.load_tokenizer(out_dir)


def check_export_dir(run_dir, out_dir):
    if os.path.abspath(run_dir) == os.path.abspath(out_dir):
        raise ValueError(f"export to {out_dir}: that is the run's own directory; name another one")
    if os.path.isfile(out_dir) or os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise ValueError(f"export to {out_dir}: a file, or a directory holding an MPNext run; name a new directory")


def export_hf(run_dir, out_dir):
    """A run's model and tokenizer as a Hugging Face checkpoint: pipeline("fill-mask", model=out_dir) works, or for a
    fine-tuned run pipeline("text-classification", model=out_dir)."""
    check_export_dir(run_dir, out_dir)
    model, tok = load_run(run_dir)
    labels = read_run(run_dir)[0].get("labels")
    model.to_hf(out_dir, labels)
    tok.to_hf(out_dir, model.cfg.max_len)
    print(f"wrote {out_dir}: transformers.AutoModelFor{'SequenceClassification' if labels else 'MaskedLM'}"
          f".from_pretrained({out_dir!r}) and AutoTokenizer.from_pretrained({out_dir!r}) load it")


def export(argv=None):
    p = OneLineParser(prog="train.py export", description="Write a run as an HF checkpoint with its tokenizer.")
    p.add_argument("--init", required=True, help="a run's --out-dir")
    p.add_argument("out", help="the directory to write")
    args = p.parse_args(argv)
    export_hf(args.init, args.out)
    return None, 0


def fill(argv=None):
    """Print the top-k tokens for each <mask> of each text. A mask stands for ONE token (a word piece)."""
    p = OneLineParser(prog="train.py fill", description="Top-k completions for each <mask> (one token each).")
    p.add_argument("--init", required=True, help="a run's --out-dir")
    p.add_argument("--top-k", type=int, default=5, help="completions per <mask> (at least 1)")
    p.add_argument("--device", default="cpu", choices=CHOICES["device"])
    p.add_argument("text", nargs="+", help='e.g. "The <mask> of the module."')
    args = p.parse_args(argv)
    check_ranges(args, {"top_k": AT_LEAST_1})
    device = pick_device(args.device)
    model, tok = load_run(args.init, device)
    lm = model.generator if is_electra(model.cfg) else model  # classic ELECTRA: its generator fills in
    results = []
    for text in args.text:
        ids = [tok.bos_id] + tok.encode(text, specials=True) + [tok.eos_id]
        where = [i for i, t in enumerate(ids) if t == tok.mask_id]
        if not where or len(ids) > model.cfg.max_len:
            raise ValueError(f"{text!r}: needs at least one <mask> and at most {model.cfg.max_len} tokens")
        with torch.no_grad():
            probs = lm(torch.tensor([ids], device=device)).float().softmax(-1)[0, where].cpu()  # (masks, V)
        top = probs.topk(min(args.top_k, probs.shape[-1]))
        results.append([[(tok.decode([j]), pr) for pr, j in zip(ps.tolist(), js.tolist())]
                        for ps, js in zip(top.values, top.indices)])
        print(text)
        for n, options in enumerate(results[-1], 1):
            print(f"  <mask> {n}: " + " | ".join(f"{piece.strip() or repr(piece)} {pr:.3f}" for piece, pr in options))
    return results, 0


# ---------------------------------------------------------------------------------------------------------------------
# the combination lab: python train.py compare --cells "A | B" --grid "flag=v1,v2" --seeds 3 --tasks T1,T2


COMPARE_SETS = {"seed", "out_dir", "resume"}  # pre-training flags compare sets for each run itself


def compare_args(argv):
    p = OneLineParser(prog="train.py compare", description="Pre-train every cell of a grid on the same budget, then "
                      "probe / fine-tune each on a list of tasks over several seeds. Other flags go to pre-training.")
    p.add_argument("--cells", default="", help='recipes separated by "|", each "flag=value ..." (e.g. "objective=mlm |'
                   ' objective=mpnet rtd=true")')
    p.add_argument("--grid", default="", help='axes crossed with every cell, e.g. "activation=gelu,mish '
                   'optimizer=adamw,ranger21"')
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (pre-training and fine-tuning)")
    p.add_argument("--tasks", default="builtin", help='comma-separated task paths; "builtin" = the stdlib task')
    p.add_argument("--protocols", default="probe", help="comma-separated: probe, low (fine-tune on --low-size "
                   "examples), full (fine-tune on all)")
    p.add_argument("--low-size", type=int, default=1000, help="training examples of the low protocol")
    p.add_argument("--finetune", default="", help='extra flags for every fine-tuning run, e.g. "--epochs 3"')
    p.add_argument("--no-random", action="store_true", help="leave out the random-init row")
    p.add_argument("--tokens", type=float, default=0, help="budget in place of --max-steps: pre-training tokens per "
                   "cell (its steps = tokens / (batch x seq-len)), for grids over --batch-size or --seq-len")
    p.add_argument("--minutes", type=float, default=0, help="budget in place of --max-steps: minutes of training "
                   "steps per cell, its steps set from a 60-step timing run of that cell (fast recipes get more steps)")
    p.add_argument("--out-dir", default="out-compare", help="runs/, results.csv, results.md (and compare.png)")
    args, pretrain = p.parse_known_args(argv)
    names = {f.name: f.type for cls in (TrainConfig, mpnext.MPNextConfig) for f in dataclasses.fields(cls)}

    def flags(spec):  # "objective=mlm rtd=true" -> ["--objective", "mlm", "--rtd"]
        out = []
        for item in spec.split():
            k, _, v = item.partition("=")
            name = k.replace("-", "_")
            if name not in names or not v or name in COMPARE_SETS:
                raise ValueError(f"--cells/--grid: {item!r} is not flag=value of a pre-training flag")
            flag = "--" + name.replace("_", "-")
            if names[name] is bool:
                if v.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(f"--cells/--grid: {item!r}: a switch takes true or false")
                out.append(flag if v.lower() in ("1", "true", "yes", "on") else "--no-" + flag[2:])
            else:
                out += [flag, v]
        return out

    cells = [c.strip() for c in args.cells.split("|")] if args.cells else [""]
    axes = [[f"{k}={v}" for v in vs.split(",")] for k, _, vs in (a.partition("=") for a in args.grid.split())]
    specs = [" ".join(filter(None, (c,) + g)) for c in cells for g in itertools.product(*axes)]
    protocols = args.protocols.split(",")
    if any(x not in ("probe", "low", "full") for x in protocols) or len(set(protocols)) < len(protocols):
        raise ValueError(f"--protocols {args.protocols}: name each of probe, low, full at most once")
    check_ranges(args, {"seeds": AT_LEAST_1, "low_size": AT_LEAST_1, "tokens": NOT_NEGATIVE, "minutes": NOT_NEGATIVE})
    check_out_dir(args.out_dir, "--out-dir")
    if len(set(specs)) < len(specs):
        raise ValueError(f"--cells/--grid: a cell appears twice ({specs}); remove the duplicate")
    given = parse_args(pretrain)[0].keys()
    if given & COMPARE_SETS:
        raise ValueError(f"compare sets {sorted(given & COMPARE_SETS)} of each run itself (seeds 0..--seeds-1); drop them")
    if bool(args.tokens) + bool(args.minutes) + ("max_steps" in given) > 1:
        raise ValueError("compare: pass one budget, --max-steps, --tokens or --minutes")
    for name in ("max_steps", "batch_size", "seq_len"):  # the budget written out: a later default cannot change it
        if name not in given and not (name == "max_steps" and (args.tokens or args.minutes)):
            pretrain = pretrain + ["--" + name.replace("_", "-"), str(getattr(TrainConfig, name))]
    grid = [(spec or "default", flags(spec)) for spec in specs]
    if args.tokens:  # equal tokens: each cell's steps from its own batch x sequence length
        grid = [(cell, extra + ["--max-steps", str(max(1, round(args.tokens / math.prod(
            pretrain_value(pretrain + extra, k) for k in ("batch_size", "seq_len")))))]) for cell, extra in grid]
    for cell, extra in grid:  # every cell's command line must pass its checks before hours of work start
        train_args, model_args = parse_args(pretrain + extra)
        if not train_args.get("init"):
            tc = TrainConfig(**train_args)
            try:
                check_run(tc, preset_config(tc, model_args))
            except ValueError as e:
                raise ValueError(f"cell {cell!r}: {e}") from None
    if any(not t.strip() for t in args.tasks.split(",")):
        raise ValueError(f"--tasks {args.tasks!r}: an empty task name; separate paths with commas")
    tasks = [(t, None if t == "builtin" else t) for t in args.tasks.split(",")]
    try:
        fc, typed = finetune_flags(shlex.split(args.finetune), prog="train.py compare --finetune")
    except ValueError as e:  # shlex: "No closing quotation"; or a value out of range
        raise ValueError(f"--finetune {args.finetune!r}: {e}") from None
    own = typed.keys() & {"init", "random_init", "out_dir", "data", "seed", "probe", "train_size"}
    if own:
        raise ValueError(f"--finetune: compare sets {sorted(own)} for each run itself; drop them")
    for t, path in tasks:  # a bad task fails now, with its one line
        data.load_task(path, fc.split_seed, args.low_size if "low" in protocols else 0, fc.label_col, fc.text_cols)
    return args, pretrain, grid, tasks, protocols


def compare(argv=None):
    """Resumable: each cell's runs live in OUT/runs/, results.csv gains one row per (cell, seed, task, protocol) and
    a rerun skips the rows it holds (and resumes an interrupted pre-training)."""
    args, pretrain, grid, tasks, protocols = compare_args(argv)
    csv_path, t0 = os.path.join(args.out_dir, "results.csv"), time.time()
    os.makedirs(os.path.join(args.out_dir, "runs"), exist_ok=True)
    budget_path = os.path.join(args.out_dir, "pretrain_flags.json")  # a rerun must not mix budgets in one table
    given = [pretrain, args.finetune] + ([{"tokens": args.tokens, "minutes": args.minutes}] if args.tokens or
                                         args.minutes else [])
    if os.path.exists(budget_path) and json.load(open(budget_path)) != given:
        raise ValueError(f"{args.out_dir} holds results of other pre-training, budget or --finetune flags "
                         f"({json.load(open(budget_path))}); use another --out-dir")
    json.dump(given, open(budget_path, "w"))
    if args.minutes:  # equal time: each cell's steps from its own timed speed, kept in steps.json for reruns
        steps_path = os.path.join(args.out_dir, "steps.json")
        timed = json.load(open(steps_path)) if os.path.exists(steps_path) else {}
        for cell, extra in grid:
            if cell not in timed:
                timing_dir = os.path.join(args.out_dir, "runs", f"{slug(cell)}-timing")
                timed[cell] = steps_for_minutes(pretrain + extra, args.minutes, timing_dir)
                json.dump(timed, open(steps_path, "w"))
        grid = [(cell, extra + ["--max-steps", str(timed[cell])]) for cell, extra in grid]
    fields = ["cell", "seed", "task", "protocol", "test_acc", "test_f1", "dev_acc", "val_mlm_loss", "pretrain_min",
              "finetune_min"]
    done = {}
    if os.path.exists(csv_path):
        done = {(r["cell"], r["seed"], r["task"], r["protocol"]): r for r in csv.DictReader(open(csv_path))}
    rows = list(done.values())
    cells = grid + ([] if args.no_random else [("random init", None)])

    def run_dir_of(cell, seed):
        return os.path.join(args.out_dir, "runs", f"{slug(cell)}-s{seed}")
    # seeds outermost: an interrupted lab holds every cell at the same number of seeds
    for seed, (cell, extra), (task, path), protocol in itertools.product(range(args.seeds), cells, tasks, protocols):
        if (cell, str(seed), task, protocol) in done:
            continue
        run_dir = run_dir_of(cell, seed)
        pre = {"val_mlm_loss": "", "pretrain_min": 0.0}
        if extra is not None:  # pre-train (or finish pre-training) the cell
            pre = pretrain_cell(pretrain + extra + ["--seed", str(seed), "--out-dir", run_dir, "--samples", "0"])
        ft_dir = os.path.join(run_dir, f"ft-{slug(task_name(task))}-{protocol}")
        if os.path.exists(ft_dir):
            shutil.rmtree(ft_dir)  # an interrupted fine-tuning: start it again
        ft = ["--out-dir", ft_dir, "--seed", str(seed)] + (["--data", path] if path else [])
        ft += [f"--{k}={pretrain_value(pretrain, k)}" for k in ("device", "dtype")] + ["--compile"] * bool(
            pretrain_value(pretrain, "compile"))  # fine-tuning runs where and as pre-training does
        # random init: the first cell's architecture and tokenizer, fresh weights: only pre-training differs
        ft += ["--init", run_dir] if extra is not None else ["--init", run_dir_of(cells[0][0], seed), "--random-init"]
        ft += {"probe": ["--probe"], "low": ["--train-size", str(args.low_size)], "full": []}[protocol]
        print(f"\n=== {cell} | seed {seed} | {task} | {protocol}", flush=True)
        res, status = finetune(ft + shlex.split(args.finetune))
        if status:
            return rows, status
        row = {"cell": cell, "seed": str(seed), "task": task, "protocol": protocol, **{k: res[k] for k in fields[4:7]},
               **pre, "finetune_min": round(res["minutes"], 3)}
        rows.append(row)
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader() if new else None
            w.writerow(row)
    steps = {cell: pretrain_value(pretrain + extra, "max_steps") for cell, extra in grid}
    n, bs, seq = max(steps.values()), *(pretrain_value(pretrain, k) for k in ("batch_size", "seq_len"))
    budget = (f"{args.tokens:,.0f} tokens" if args.tokens else f"{args.minutes:g} minutes of training steps"
              if args.minutes else f"{n} steps x {bs} x {seq} tokens ({n * bs * seq / 1e6:.1f}M tokens)") + " per cell"
    if len(set(steps.values())) > 1 or args.tokens or args.minutes:
        budget += " (steps: " + ", ".join(f"{c} {k}" for c, k in steps.items()) + ")"
    table = compare_table(rows, [c for c, _ in cells], tasks, protocols, pretrain, budget, (time.time() - t0) / 60)
    open(os.path.join(args.out_dir, "results.md"), "w").write(table)
    print("\n" + table)
    compare_plot(args.out_dir, rows, [c for c, _ in cells], [(t, p) for t, _ in tasks for p in protocols])
    return rows, 0


def slug(text):
    return re.sub(r"[^\w.=-]+", "_", text)


def task_name(task):
    return os.path.basename(task.rstrip("/"))


def pretrain_value(argv, name):
    """The value a pre-training command line gives a flag (its default when absent)."""
    tc, mc = parse_args(argv)
    return {**dataclasses.asdict(TrainConfig()), **tc, **mc}.get(name)


def pretrain_or_stop(argv):
    """One pre-training run of the grid; a stopped or failed run stops compare with its exit status."""
    status = train(*setup(argv))[2]
    if status:
        print("compare: stopped. Run the same compare command again to go on: it keeps every finished row, resumes "
              "a stopped pre-training and times an interrupted timing run again", file=sys.stderr)
        raise SystemExit(status)


def steps_for_minutes(argv, minutes, timing_dir):
    """Steps that fill `minutes` with this cell's training steps: its tokens/s over the fastest 10 of steps 11-60 of a
    timing run (the first 10 hold warm-up and compilation; the fastest window is the least disturbed on a shared
    machine, as in --benchmark; evaluation is not counted)."""
    shutil.rmtree(timing_dir, ignore_errors=True)
    timing = ["--max-steps", "60", "--log-every", "10", "--eval-every", "60", "--warmup-steps", "0",
              "--schedule-steps", "0", "--seed", "0", "--samples", "0", "--out-dir", timing_dir]
    print(f"\n=== timing {' '.join(argv)}", flush=True)
    pretrain_or_stop(argv + timing)
    tok_s = [json.loads(line)["tok_s"] for line in open(os.path.join(timing_dir, "log.jsonl")) if '"tok_s"' in line]
    shutil.rmtree(timing_dir)
    tokens_per_step = math.prod(pretrain_value(argv, k) for k in ("batch_size", "seq_len"))
    return max(1, int(minutes * 60 * max(tok_s[1:]) / tokens_per_step))


def pretrain_cell(argv):
    """Pre-train a cell to its --max-steps (resuming a stopped run); its val_mlm_loss and minutes from the log."""
    out_dir = argv[argv.index("--out-dir") + 1]
    path = os.path.join(out_dir, "ckpt.pt")
    step = read_run(out_dir)[0]["step"] if os.path.exists(path) else 0
    if step < pretrain_value(argv, "max_steps"):
        pretrain_or_stop(argv + ["--resume"] * bool(step))
    evals = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl")) if '"val_loss"' in line]
    start = os.path.getmtime(os.path.join(out_dir, "train_tokens.npz"))  # written just before training starts
    return {"val_mlm_loss": evals[-1].get("val_mlm_loss", ""),
            "pretrain_min": round((os.path.getmtime(path) - start) / 60, 3)}


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def compare_table(rows, cells, tasks, protocols, pretrain, budget, minutes):
    """Markdown: one row per cell, test accuracy (%) mean +- std over seeds per task and protocol, their average."""
    cols = [(t, p) for t, _ in tasks for p in protocols]
    device = pick_device(pretrain_value(pretrain, "device"))
    lines = [f"Budget: {budget}, "
             f"preset {pretrain_value(pretrain, 'preset')}, data {pretrain_value(pretrain, 'data') or 'stdlib'}; "
             f"{device_name(device)}; this call {minutes:.1f} min. Test accuracy (%), mean +- std over seeds.", "",
             "| cell | " + " | ".join(f"{task_name(t)} {p}" for t, p in cols) +
             " | average | val_mlm_loss | pre-train min |", "|---" * (len(cols) + 4) + "|"]
    for cell in cells:
        mine = [r for r in rows if r["cell"] == cell]
        cells_txt, seeds_avg = [], []
        for t, p in cols:
            acc = [100 * float(r["test_acc"]) for r in mine if r["task"] == t and r["protocol"] == p]
            cells_txt.append("%.1f +- %.1f" % mean_std(acc) if acc else "")
        per_seed = {}
        for r in mine:
            per_seed.setdefault(r["seed"], []).append(100 * float(r["test_acc"]))
        seeds_avg = [sum(v) / len(v) for v in per_seed.values() if len(v) == len(cols)]
        loss = [float(r["val_mlm_loss"]) for r in mine if r["val_mlm_loss"] not in ("", None)]
        mins = {r["seed"]: float(r["pretrain_min"]) for r in mine}
        lines.append(f"| {cell} | " + " | ".join(cells_txt) +
                     f" | {'%.1f +- %.1f' % mean_std(seeds_avg) if seeds_avg else ''}"
                     f" | {'%.3f' % mean_std(loss)[0] if loss else '-'}"
                     f" | {'%.1f' % mean_std(list(mins.values()))[0] if mins else ''} |")
    return "\n".join(lines) + "\n"


def compare_plot(out_dir, rows, cells, cols):
    """compare.png (matplotlib only if installed): validation MLM loss over pre-training steps (seed 0 of each
    cell), and each cell's test accuracy per task and protocol, with its seed spread."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.4 * len(cells) * len(cols) + 2))
    for cell in cells:
        log = os.path.join(out_dir, "runs", f"{slug(cell)}-s0", "log.jsonl")
        evals = [json.loads(line) for line in open(log) if '"val_mlm_loss"' in line] if os.path.exists(log) else []
        if evals:  # random init and classic ELECTRA have no curve
            a.plot([e["step"] for e in evals], [e["val_mlm_loss"] for e in evals], label=cell)
    a.set(xlabel="pre-training step", ylabel="val_mlm_loss", title="validation MLM loss (seed 0)")
    a.legend(fontsize=7)
    height, lowest = 0.8 / len(cols), 100.0
    for k, (task, protocol) in enumerate(cols):
        stats = [mean_std([100 * float(r["test_acc"]) for r in rows if (r["cell"], r["task"], r["protocol"]) ==
                           (c, task, protocol)] or [math.nan]) for c in cells]
        lowest = min([lowest] + [m for m, _ in stats if m == m])
        b.barh([i + k * height for i in range(len(cells))], [m for m, _ in stats], height, xerr=[s for _, s in stats],
               label=f"{task_name(task)} {protocol}")
    b.set(yticks=[i + 0.4 - height / 2 for i in range(len(cells))], yticklabels=cells, xlim=(max(0, lowest - 10), 100),
          xlabel="test accuracy (%), mean +- std over seeds")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "compare.png"), dpi=110)
    plt.close(fig)


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or device


def fastest(reps, sync, *fns):
    """Seconds of the fastest of `reps` calls of each function, after one warm-up call each. The calls alternate, so
    on a shared machine each function meets the same neighbours; the fastest call is the least disturbed one."""
    best = [math.inf] * len(fns)
    for fn in fns:
        fn()
    for _ in range(reps):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def matmul_peak(device, dtype, sync):
    """(a call, its FLOPs): the fastest of a few square matmuls in this dtype, to be timed beside each step."""
    sizes = (1024, 2048, 4096, 8192) if device == "cuda" else (1024, 1536, 2048)
    calls = [lambda a=torch.randn(n, n, device=device, dtype=dtype): a @ a for n in sizes]
    seconds = fastest(5 if device == "cpu" else 20, sync, *calls)
    n, call, _ = max(zip(sizes, calls, seconds), key=lambda r: r[0] ** 3 / r[2])
    return call, 2 * n**3


BENCH_VARIANTS = [dict(objective="mlm"), dict(objective="plm"), dict(objective="mpnet"), dict(objective="mlm", rtd=True),
                  dict(objective="mpnet", rtd=True), dict(objective="mpnet", masking="span", sbo=True)]
BENCH_ROWS = ["hf", "mlm", "plm", "mpnet", "mlm+rtd", "mpnet+rtd", "mpnet+span+sbo"]  # --bench-only names


def benchmark(tc, cfg, tok, device, train_b, val_b, ckpt=None, init_state=None, steps=10):
    """Side-by-side timings in one process: BPE training and encoding on the corpus, then a full training step
    (forward, backward, AdamW) of each objective and head on the same batch, and of HF's MPNetForMaskedLM when
    installed, in each precision the device runs natively. Each step's model FLOPs (3 x the forward matmul FLOPs,
    attention dense, counted by torch's FlopCounterMode) over its time is compared with the matmul peak: the fastest
    square matmul in that dtype, timed in turns with the step so that both meet the same machine; "build" is the
    share of step time spent building batches."""
    text = "\n".join(data.load_documents(tc.data or None))
    mb = len(text.encode()) / 1e6
    t0 = time.perf_counter()
    fresh = data.Tokenizer.train(text, vocab_size=tc.vocab)
    t1 = time.perf_counter()
    data.Tokenizer(fresh.merges).encode(text)  # a new instance: cold word cache
    t2 = time.perf_counter()
    print(f"tokenizer | {mb:.2f} MB | train {fresh.vocab_size} vocab: {t1 - t0:.1f} s | encode: {mb / (t2 - t1):.1f} MB/s")
    ids, starts = train_b.sample(torch.Generator().manual_seed(tc.seed))
    mlm = mpnext.make_batch(ids, mlm_probe(cfg), torch.Generator().manual_seed(0), starts)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def measure(model, loss_fn, batch, autocast, peak):
        """(seconds per step, model FLOPs per step, peak MB on CUDA, matmul peak FLOP/s timed in turns with it) of a
        full training step; peak = (a matmul call, its FLOPs)."""
        model.to(device).train()
        batch = to_device(batch, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        with FlopCounterMode(display=False) as counter, autocast:  # counted eagerly, timed as the run would train
            loss_fn(model, batch)
        loss_fn = torch.compile(loss_fn) if tc.compile else loss_fn  # compiles in the warm-up steps
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step():
            with autocast:
                loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # a second warm-up step (compilation may take two)
        seconds, peak_seconds = fastest(steps, sync, step, peak[0])
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        return seconds, 3 * counter.get_total_flops(), peak_mb, peak[1] / peak_seconds

    def build_seconds(vcfg):
        g = torch.Generator().manual_seed(1)

        def build():
            block, word_starts = train_b.sample(g)
            mpnext.make_batch(block, vcfg, g, word_starts)
        return fastest(steps, sync, build)[0]

    variants = [dataclasses.replace(cfg, **{**dict(masking="token", rtd=False, sbo=False), **v}) for v in BENCH_VARIANTS]
    only = set(tc.bench_only.split(",")) if tc.bench_only else None
    variants = [v for v in variants if only is None or recipe(v) in only]
    if tc.dtype != "auto":  # an explicit --dtype: that precision alone
        dtypes = [pick_dtype(tc.dtype, device)]
    else:
        dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16(device) else [])
    print(f"training step | {device_name(device)} ({device}) | batch {ids.shape[0]} x {ids.shape[1]} tokens | "
          f"fastest of {steps} steps{' | torch.compile' if tc.compile else ''} | model FLOPs = 3 x forward matmul FLOPs")
    for dtype in dtypes:
        autocast, name = autocast_for(device, dtype), str(dtype).split(".")[-1]
        peak = matmul_peak(device, dtype, sync)
        rows = {}
        if only is None or "hf" in only:
            try:
                import transformers
                hc = transformers.MPNetConfig(
                    vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                    num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len + 2,
                    layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.dropout,
                    attention_probs_dropout_prob=cfg.attn_dropout)
                labels = torch.full_like(ids, -100).scatter_(1, mlm["pred_positions"], mlm["targets"])  # fillers: -100
                rows["HF MPNetForMaskedLM (mlm)"] = measure(
                    transformers.MPNetForMaskedLM(hc), lambda m, b: m(input_ids=b["ids"], labels=b["labels"]).loss,
                    {"ids": mlm["input_ids"], "labels": labels}, autocast, peak) + (None,)
            except ImportError:
                print("  transformers is not installed: no HF reference row")
        for vcfg in variants:
            try:
                batch = mpnext.make_batch(ids, vcfg, torch.Generator().manual_seed(0), starts)
                model = mpnext.MPNext(vcfg)
            except ValueError as e:  # e.g. a --seq-len too short for the replaced set
                print(f"  MPNext {recipe(vcfg)}: skipped ({e})")
                continue
            rows[f"MPNext {recipe(vcfg)}"] = measure(model, lambda m, b: m.loss(b)[0], batch, autocast, peak) + (
                build_seconds(vcfg),)
        peaks = [r[3] / 1e9 for r in rows.values()]
        print(f"{name}: matmul peak measured beside each step {min(peaks, default=0):.0f}-{max(peaks, default=0):.0f} "
              f"GFLOP/s")
        ref, mlm_row = rows.get("HF MPNetForMaskedLM (mlm)"), rows.get("MPNext mlm")
        for row, (sec, flops, peak_mb, row_peak, build) in rows.items():
            cells = [f"{sec * 1e3:8.1f} ms/step", f"{ids.numel() / sec / 1e3:6.1f}k tok/s",
                     f"{flops / 1e9:6.1f} GFLOP", f"{flops / sec / row_peak:4.0%} of peak"]
            cells += [f"build {build / (build + sec):4.1%}"] if build is not None else []
            cells += [f"{peak_mb:.0f} MB peak"] if peak_mb is not None else []
            cells += [f"{sec / mlm_row[0]:.2f}x MLM's time"] if mlm_row and row.startswith("MPNext") else []
            cells += [f"{ref[0] / sec:.2f}x HF's MLM speed"] if ref else []
            print(f"  {row:<26} " + " | ".join(cells))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else None
    try:
        one_process = command or ("--benchmark" if "--benchmark" in argv else None)
        if one_process and torchrun():
            raise ValueError(f"train.py {one_process} runs in one process; start it with python, not torchrun")
        if command:
            return COMMANDS[command](argv)[1]
        if torchrun():  # rank 0 trains the tokenizer and writes the token caches, then the rest read them
            start_processes()
            if world()[0] > 0:
                dist.barrier()
        run = setup(argv)
    except (data.DataError, ValueError) as e:  # user mistakes: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if torchrun() and world()[0] == 0:
        dist.barrier()
    if run[0].benchmark:
        benchmark(*run)
        return 0
    status = train(*run)[2]  # 0, or 1 after persistent non-finite losses, or 128 + signal after Ctrl-C / SIGTERM
    if status == 0 and run[0].export_hf and world()[0] == 0:
        export_hf(run[0].out_dir, run[0].export_hf)
    if torchrun():  # leave together: Gloo can abort a process that tears down while another still runs
        dist.barrier()
        dist.destroy_process_group()
    return status


COMMANDS = {"finetune": finetune, "compare": compare, "fill": fill, "export": export}

if __name__ == "__main__":
    sys.exit(main())
