"""
Pre-train MPNext on your own text, on CPU or GPU: one process, or several under torchrun.

    python train.py                                    # offline default: ~5 min on 2 CPU cores, stdlib docstrings
    python train.py --data my_text.txt --preset small --objective mlm --rtd --masking span --sbo --max-steps 5000
    python train.py --out-dir out --max-steps 2000 --resume   # continue a run exactly where it stopped
    python train.py --init microsoft/mpnet-base --data my_domain/ --masking word   # continue a real MPNet
    torchrun --nproc-per-node 4 train.py --preset base # several GPUs (or CPU processes): --batch-size is global

Every field of MPNextConfig and TrainConfig is a flag; a run writes DIR/log.jsonl, ckpt.pt and tokenizer.json.
Fine-tuning, the probe, compare, the benchmark, fill and export: python -m lab --help.
"""

import argparse
import contextlib
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import mpnext


@dataclass
class TrainConfig:
    data: str = ""  # a .txt file, a directory of .txt files, "shakespeare", or "" for the offline stdlib docstrings
    out_dir: str = "out"  # where log.jsonl, ckpt.pt and tokenizer.json go
    preset: str = "tiny"  # model size (the model flags below override single fields)
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
    optimizer: str = "adamw"  # AdamW (MPNet), RAdam, Ranger (RAdam + Lookahead + GC) or Ranger21
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
    device: str = "auto"  # auto: cuda, else mps, else cpu
    dtype: str = "auto"  # auto: bf16 where matmuls have it, else fp16 on CUDA, else fp32
    compile: bool = False  # torch.compile the loss (GPU speed knob; costs seconds to minutes at start)
    resume: bool = False  # continue from out_dir/ckpt.pt
    init: str = ""  # start from the weights and tokenizer of an MPNext run or an HF MPNet checkpoint (dir or hub name)
    export_hf: str = ""  # at the end, also write a Hugging Face checkpoint with its tokenizer to this directory


# ---------------------------------------------------------------------------------------------------------------------
# command line: every dataclass field becomes a flag, and check_run judges them all in one place

CHOICES = dict(mpnext.CHOICES, preset=tuple(mpnext.PRESETS), device=("auto", "cpu", "cuda", "mps"),
               dtype=("auto", "float32", "bfloat16", "float16"))
NOT_FLAGS = {"vocab_size", "pad_id", "mask_id", "special_ids", "n_classes", "pooling"}  # set by the data or finetune


def field_help(cls):
    """The comment after each field in the class source is its --help text (one source of truth)."""
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(cls), flags=re.M))


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prog", "python train.py")
        super().__init__(*args, allow_abbrev=False, **kwargs)  # "--pres small" is a typo, not --preset
        # argparse takes "-1e-3" for an option (its pattern knows no exponent): read it as a number, then judge it
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):  # argparse would print the whole usage first: one line says it
        if self.prog == "python train.py" and re.match(r"unrecognized arguments: [^-]", message):  # a command?
            message += "; train.py only pre-trains (fine-tuning and the lab's other commands: python -m lab --help)"
        self.exit(2, f"error: {message} ({self.prog} --help lists every flag)\n")


def add_fields(p, cls, defaults=None):
    """Every field of the dataclass becomes a --flag; only flags actually typed end up in the namespace (SUPPRESS)."""
    group, helps = p.add_argument_group(f"{cls.__name__} fields"), field_help(cls)
    for f in dataclasses.fields(cls):
        if cls is mpnext.MPNextConfig and f.name in NOT_FLAGS:
            continue
        default = (defaults or {}).get(f.name, f.default)
        help_ = (helps.get(f.name, "") + f" (default: {default})" * (default != "")).replace("%", "%%")  # (argparse: %)
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(flag, type=f.type, default=argparse.SUPPRESS, help=help_, choices=CHOICES.get(f.name),
                               metavar=None if f.name in CHOICES else f.name.upper())  # choices: {a,b,c}


def parse_args(argv=None):
    """Returns (train flags, model flags) holding only what the user typed, so --resume can tell them apart."""
    p = OneLineParser(usage="%(prog)s [flags]  (all below)", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    preset_arg = OneLineParser(add_help=False)  # --help shows the defaults of the preset in use
    preset_arg.add_argument("--preset", default=TrainConfig.preset)
    add_fields(p, TrainConfig)
    add_fields(p, mpnext.MPNextConfig, mpnext.PRESETS.get(preset_arg.parse_known_args(argv)[0].preset, {}))
    given = vars(p.parse_args(argv))
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    return ({k: v for k, v in given.items() if k in train_names},
            {k: v for k, v in given.items() if k not in train_names})


AT_LEAST_1, NOT_NEGATIVE, POSITIVE = (lambda v: v >= 1, "at least 1"), (lambda v: v >= 0, "0 or more"), (
    lambda v: v > 0, "positive")


def check_ranges(config, rules):
    """rules {field: (test, what the value must be)}: a ValueError for the first flag that fails (NaN fails all)."""
    for name, (ok, want) in rules.items():
        if not ok(getattr(config, name)):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be {want}")


def check_run(tc, cfg):
    """Every check of a run's flags that needs no data: a ValueError for the first that fails."""
    mpnext.check_config(cfg)
    check_ranges(tc, {**dict.fromkeys(("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every",
                                       "eval_batches", "log_every"), AT_LEAST_1),
                      **dict.fromkeys(("warmup_steps", "samples", "weight_decay"), NOT_NEGATIVE),
                      "save_every": (NOT_NEGATIVE[0], "0 (at evaluations only) or positive"),
                      "schedule_steps": (NOT_NEGATIVE[0], "0 (= --max-steps) or positive"),
                      "grad_clip": (NOT_NEGATIVE[0], "0 (off) or a positive norm"), "eps": POSITIVE,
                      "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
                      "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1], a fraction of --lr")})
    n_bpe, procs = len(data.SPECIAL_TOKENS) + 256, world()[1]
    checks = [  # (wrong, what to say)
        (tc.seq_len > cfg.max_len, f"--seq-len {tc.seq_len} exceeds the model's max_len {cfg.max_len}"),
        (tc.vocab < n_bpe, f"--vocab {tc.vocab}: a byte-level BPE needs at least {n_bpe} (specials + 256 bytes)"),
        (not (math.isfinite(tc.lr) and 0 < tc.lr < 1), f"--lr {tc.lr}: must be positive and below 1 (default 1.5e-3)"),
        (round(cfg.pred_ratio * tc.seq_len) < 1,
         f"--pred-ratio {cfg.pred_ratio} x --seq-len {tc.seq_len} predicts no token; raise either"),
        (cfg.rtd and cfg.objective != "mlm" and mpnext.replaced_count(cfg, tc.seq_len) < 1,
         f"--rtd-ratio {cfg.rtd_ratio} x --seq-len {tc.seq_len} replaces no token; raise either"),
        (tc.batch_size % (tc.grad_accum * procs), f"--batch-size {tc.batch_size} must be a multiple of --grad-accum "
                                                  f"{tc.grad_accum}" + f" x {procs} processes" * (procs > 1)),
        (tc.schedule_steps and tc.max_steps > tc.schedule_steps and tc.min_lr_ratio == 0 and tc.optimizer != "ranger21",
         f"--max-steps {tc.max_steps} runs past --schedule-steps {tc.schedule_steps} (learning rate 0): raise it"),
        (torchrun() and tc.device == "mps", "torchrun: --device mps cannot join a process group; use cpu or cuda")]
    for wrong, message in checks:
        if wrong:
            raise ValueError(message)
    if tc.export_hf:
        mpnext.check_hf_exportable(cfg)
        data.check_export_dir(tc.out_dir, tc.export_hf)


# ---------------------------------------------------------------------------------------------------------------------
# device and precision, the update step, signals

def pick_device(name):  # (argparse's choices have checked the name)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(d for d, ok in available.items() if ok)
    if not available[name]:
        raise ValueError(f"--device {name}: PyTorch sees no {name} device here; use --device auto or cpu")
    return name


def native_bf16(device):
    """bf16 matmuls in hardware: CUDA with bf16, or a CPU with AVX-512 BF16 or AMX (torch's own, private, probes)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return torch.cuda.is_bf16_supported() if device == "cuda" else (
        device == "cpu" and any(getattr(torch.cpu, p, lambda: False)() for p in probes))


def pick_dtype(name, device):
    """auto: bf16 autocast where the hardware has bf16 matmuls; fp16 with loss scaling on older GPUs; else fp32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16 if device == "cuda" else torch.float32
    if name == "float16" and device != "cuda" and world()[0] == 0:  # (rank 0 speaks for the run)
        print(f"warning: --dtype float16 on {device}: made for CUDA, slow or unsupported here", file=sys.stderr)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_for(device, dtype):
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


MAX_BAD_STEPS = 5  # non-finite losses in a row before a run gives up


class Updater:
    """After backward(): set the learning rate, clip the gradient norm (0: off), step only on a finite loss and finite
    gradients (fp16: the scaler skips an overflow and lowers its scale; 6 x MAX_BAD_STEPS in a row give up)."""

    def __init__(self, model, optimizer, scaler, clip):
        self.model, self.optimizer, self.scaler, self.clip = model, optimizer, scaler, clip
        self.bad, self.overflows = 0, 0

    def __call__(self, loss, lr, step):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)  # true gradients for clipping and the inf check (no-op without fp16)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip if self.clip > 0 else math.inf)
        grads_ok = bool(torch.isfinite(norm))
        if bool(torch.isfinite(loss)) and (grads_ok or self.scaler.is_enabled()):
            self.scaler.step(self.optimizer)  # (fp16: the scaler skips an overflow itself, and lowers its scale)
            self.overflows = 0 if grads_ok else self.overflows + 1
            self.bad = self.overflows if self.overflows >= 6 * MAX_BAD_STEPS else 0
        else:
            self.bad += 1
            tqdm.write(f"step {step}: the loss or the gradients are not finite; update skipped "
                       f"({self.bad} in a row, the run stops at {MAX_BAD_STEPS})")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def gave_up(self):
        return self.bad >= MAX_BAD_STEPS


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM: stop after this step and save; a second one: at once (main thread only)."""

    def __enter__(self):
        self.signum, self.t = None, 0.0
        main = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        return self

    def request(self, signum, frame):
        if self.signum is not None and torchrun() and time.time() - self.t < 2:
            return  # one Ctrl-C reaches a torchrun worker twice: from the terminal, and forwarded by torchrun
        if self.signum is not None:  # one line, not a traceback from wherever the loop was
            print("\nstopped at once, without saving", file=sys.stderr)
            sys.exit(128 + signum)
        self.signum, self.t = signum, time.time()
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                   f"(press Ctrl-C again to stop at once, without saving)")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be restored from here
                signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------------------------
# several processes: torchrun --nproc-per-node N train.py ... (PyTorch's DistributedDataParallel, arXiv 2006.15704)
# --batch-size stays the global batch: each optimizer step averages processes x --grad-accum micro-batches, and
# micro-batch slot s (process r, accumulation a: s = r * grad_accum + a) draws from its own generator stream s. So a
# 2-process run and a 1-process run with --grad-accum 2 train on the same batches; stream 0 is the 1-process stream.

def world():  # (rank, number of processes): torchrun sets RANK and WORLD_SIZE
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def torchrun():
    return "WORLD_SIZE" in os.environ  # even with one process: the same code path, on one GPU or one CPU


def start_processes():
    """Join torchrun's process group: Gloo for CPU tensors, NCCL for CUDA ones; one GPU per process."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if world()[0] > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run; errors (stderr) still show from every rank


class LossOf(torch.nn.Sequential):  # LossOf(model): the model as its one child
    """DistributedDataParallel averages the gradients of what its forward() computes: here, model.loss."""

    def forward(self, batch):
        return self[0].loss(batch)


def loss_function(model, cfg, device, compile_):
    """model.loss: under torchrun in DistributedDataParallel (classic ELECTRA leaves its LM head out of the loss)."""
    net = model.loss
    if torchrun():
        net = torch.nn.parallel.DistributedDataParallel(
            LossOf(model), device_ids=[torch.cuda.current_device()] if device == "cuda" else None,
            find_unused_parameters=mpnext.is_electra(cfg))
    return torch.compile(net) if compile_ else net


def sync_after_last(loss_fn, a, n):
    """torchrun: average the gradients over processes once, after the last of n micro-batches."""
    return loss_fn.no_sync() if torchrun() and a < n - 1 else contextlib.nullcontext()


def agree(step_loss, stopping):
    """torchrun: every process averages the loss and stops if any was asked to, so all skip, log and stop alike."""
    if not torchrun():
        return step_loss, stopping
    agreed = torch.stack([step_loss.float(), torch.tensor(float(stopping), device=step_loss.device)])
    dist.all_reduce(agreed)
    return agreed[0] / world()[1], bool(agreed[1] > 0)


def rng_states(gens, device):
    """Every batch stream and dropout RNG of every process, for an exact resume (torchrun: every process calls it)."""
    mine = {"batches": [g.get_state() for g in gens], "torch": [torch.get_rng_state()]}
    if device == "cuda":
        mine["cuda"] = [torch.cuda.get_rng_state()]
    if not dist.is_initialized():
        return mine
    everyone = [None] * world()[1]
    dist.all_gather_object(everyone, mine)
    return {k: [s for r in everyone for s in r[k]] for k in mine}


# ---------------------------------------------------------------------------------------------------------------------
# evaluation and samples

@torch.no_grad()
def evaluate(model, batches, cfg, tc, device, autocast):
    """The run's losses (val_*) and the plain MLM score (val_mlm_*) on fixed blocks, with a fixed masking seed."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    tasks = [("val", cfg)] + ([] if mpnext.is_electra(cfg) else [("val_mlm", mpnext.mlm_probe(cfg))])
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
    """A few validation snippets with ~15% of their words hidden, filled in by the model (classic ELECTRA: its
    generator, as the discriminator has no trained LM head)."""
    model.eval()
    lm, lines = model.generator if mpnext.is_electra(cfg) else model, []
    for i, (ids, starts) in enumerate(itertools.islice(batches.iterate(), n_samples)):
        ids, starts = ids[:1, :width], starts[:1, :width]
        wcfg = dataclasses.replace(mpnext.mlm_probe(cfg), masking="word", mask_prob=1.0, random_prob=0.0)
        batch = mpnext.make_batch(ids, wcfg, torch.Generator().manual_seed(i), starts)
        pred = lm(batch["input_ids"].to(device)).argmax(-1).cpu()[0]
        hidden = set(batch["pred_positions"][0].tolist())
        shown = [f"[{tok.decode([int(pred[j])])}|{tok.decode([int(ids[0, j])])}]" if j in hidden
                 else tok.decode([int(ids[0, j])]) for j in range(1, ids.shape[1])]
        lines.append("  " + "".join(shown).replace("\n", " ").strip())
    model.train()
    return "fill-in samples, [prediction|truth]:\n" + "\n".join(lines)


SCORES = {"acc": " acc {acc}", "mlm_loss": " | val_mlm_loss {mlm_loss} acc {mlm_acc}",  # each where the run has it
          "gen_acc": " | rtd: gen_acc {gen_acc} replaced {replaced} disc_acc {disc_acc} auc {disc_auc} "
                     "P {disc_precision} R {disc_recall}", "sbo_loss": " | sbo_loss {sbo_loss} acc {sbo_acc}"}


def score_line(ev):
    """val_loss (all losses weighted; its LM part if other heads add to it), the plain MLM score, ELECTRA, SBO."""
    s = {k.removeprefix("val_"): f"{v:.3f}" for k, v in ev.items()}
    lm = abs(ev.get("val_lm_loss", ev["val_loss"]) - ev["val_loss"]) > 1e-9
    return f"val_loss {s['loss']}" + f" (lm {s.get('lm_loss')})" * lm + "".join(
        line.format(**s) for k, line in SCORES.items() if k in s)


# ---------------------------------------------------------------------------------------------------------------------
# setup: flags, checkpoint, data and tokenizer; everything a user's input can break happens here, before training

def setup(argv=None):
    """(train config, model config, tokenizer, device, train / val batches, checkpoint to resume, --init weights)"""
    train_args, model_args = parse_args(argv)
    out_dir = train_args.get("out_dir", TrainConfig.out_dir)
    ckpt, init_state, tok = None, None, None
    if train_args.get("init") and not train_args.get("resume"):
        data.check_init(train_args["init"])  # the input before the output: a mistyped path is refused at once
    data.check_out_dir(out_dir, "--out-dir")
    if train_args.get("resume"):
        tc, cfg, ckpt = resume_configs(out_dir, train_args, model_args)
        tok = data.load_tokenizer(out_dir)
    elif os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise ValueError(f"{out_dir} already holds a run: train it further with --resume and a larger --max-steps, "
                         f"or start a new one with another --out-dir")
    elif train_args.get("init"):  # the checkpoint fixes the model size and the vocabulary; objective and heads are free
        tc = TrainConfig(**train_args)
        cfg, init_state, tok = data.read_init(tc.init)
        clash = sorted(k for k, v in model_args.items() if k in mpnext.ARCH_FIELDS and getattr(cfg, k) != v)
        clash += [f for f in ("preset", "vocab") if f in train_args]
        if clash:
            raise ValueError(f"--init {tc.init} fixes the model size and vocabulary; drop {clash}")
        cfg = dataclasses.replace(cfg, **model_args)
    else:  # a new model: the preset, long enough for --seq-len, with the model flags on top
        tc = TrainConfig(**train_args)
        cfg = mpnext.MPNextConfig.from_preset(tc.preset, tc.seq_len, **model_args)
    check_run(tc, cfg)  # fail fast, before any data work
    device, rank, procs = pick_device(tc.device), *world()
    micro_batch = tc.batch_size // (tc.grad_accum * procs)
    tok, train_b, val_b = data.prepare(tc.data or None, out_dir, tc.seq_len, (micro_batch, tc.batch_size), tok,
                                       tc.vocab, tc.seed, rank)
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size, pad_id=tok.pad_id, mask_id=tok.mask_id,
                              special_ids=tok.special_ids)  # a new tokenizer's; for --resume and --init, unchanged
    if "warmup_steps" in train_args and tc.warmup_steps >= (tc.schedule_steps or tc.max_steps) and rank == 0:
        print(f"warning: --warmup-steps {tc.warmup_steps} covers the whole learning-rate plan", file=sys.stderr)
    return tc, cfg, tok, device, train_b, val_b, ckpt, init_state


def resume_configs(out_dir, train_args, model_args):
    """--resume: the checkpoint's configs with the typed training flags on top; the model may not change."""
    if not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise ValueError(f"--resume: {out_dir}/ckpt.pt does not exist; run without --resume first")
    ckpt = data.read_run(out_dir)
    try:
        tc = dataclasses.replace(TrainConfig(**ckpt["train_config"]), **train_args)  # typed flags win
        cfg = mpnext.MPNextConfig(**ckpt["model_config"])
        ckpt["rng"] = {k: v if isinstance(v, list) else [v] for k, v in ckpt["rng"].items()}  # tensors: 1 stream
        saved, n_streams = ckpt["train_config"]["preset"], len(ckpt["rng"]["batches"])
    except Exception as e:  # a checkpoint of another version, or of a fine-tuning run
        raise ValueError(f"--resume: {out_dir}/ckpt.pt is not a pre-training checkpoint this train.py can resume "
                         f"({type(e).__name__}); use another --out-dir") from None
    if tc.preset != saved:  # (tc holds the typed flags already)
        raise ValueError(f"--resume keeps the checkpoint's model (preset {saved}); drop --preset or change --out-dir")
    if n_streams != world()[1] * tc.grad_accum:  # per process and micro-batch slot (see "several processes" above)
        raise ValueError(f"--resume: {out_dir}/ckpt.pt was written by {n_streams} batch stream(s) (processes x "
                         f"--grad-accum), this run has {world()[1]} x {tc.grad_accum}; resume with {n_streams} in all "
                         f"(in one process: --grad-accum {n_streams}, which draws the same batches)")
    if tc.max_steps <= ckpt["step"]:
        raise ValueError(f"--resume: {out_dir} is at step {ckpt['step']} already; to train further, pass a larger "
                         f"--max-steps")
    changed = sorted(k for k, v in model_args.items() if getattr(cfg, k) != v)
    if changed:  # the same command line plus --resume is fine; a different model is not
        raise ValueError(f"--resume keeps the model/objective of the checkpoint; drop or fix {changed}")
    return tc, cfg, ckpt


def make_optimizer(model, tc):
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    outputs = [n for n in ("tok_emb", "head_bias", "generator.head_bias", "disc.out", "sbo.bias") if n in names]
    return mpnext.build_optimizer(model, tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay,
                                  betas=(tc.beta1, tc.beta2), eps=tc.eps, lookahead=tc.lookahead, gc=tc.gc,
                                  num_iterations=tc.schedule_steps or tc.max_steps, output_layer_names=outputs)


# ---------------------------------------------------------------------------------------------------------------------
# the run

def build(tc, cfg, device, ckpt, init_state):
    """Model, optimizer, loss scaler and this process's batch streams: new, or all of them as --resume's saved them."""
    torch.manual_seed(tc.seed)
    model = mpnext.MPNext(cfg).to(device)
    if init_state is not None and ckpt is None:  # --init: its encoder; heads it lacks (or of another size) start fresh
        own = model.state_dict()
        init_state = {k: v for k, v in init_state.items() if k in own and own[k].shape == v.shape}
        missing, _ = model.load_state_dict(init_state, strict=False)
        assert all(k.startswith(("generator.", "disc.", "sbo.", "head_")) for k in missing), missing
    optimizer = make_optimizer(model, tc)
    scaler = torch.amp.GradScaler(device, enabled=pick_dtype(tc.dtype, device) == torch.float16)
    rank = world()[0]
    slots = range(rank * tc.grad_accum, (rank + 1) * tc.grad_accum)  # this process's micro-batch slots
    gens = [torch.Generator().manual_seed(tc.seed + s * 2**32) for s in slots]  # batches and masks; slot 0: the seed
    torch.manual_seed(tc.seed + rank * 2**32)  # dropout: the same weights everywhere, other masks per process
    step, best = 0, math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the run that saved it had no fp16 scaler
            scaler.load_state_dict(ckpt["scaler"])
        step, best, rng = ckpt["step"], ckpt["best_val"], ckpt["rng"]
        for s, g in zip(slots, gens):
            g.set_state(rng["batches"][s])
        torch.set_rng_state(rng["torch"][rank])  # dropout
        if device == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"][rank])
    return model, optimizer, scaler, gens, step, best


def learning_rate(tc, step):
    """The learning rate of the update at `step`; Ranger21 runs its own warmup and warmdown on top of a flat one."""
    plan = mpnext.lr_multiplier(step, tc.warmup_steps, tc.schedule_steps or tc.max_steps, tc.decay, tc.min_lr_ratio)
    return tc.lr * (1.0 if tc.optimizer == "ranger21" else plan)


def save_checkpoint(tc, cfg, model, optimizer, scaler, step, best, rng):
    """DIR/ckpt.pt, all an exact resume needs, by rank 0; never non-finite weights. True if it now holds `step`."""
    if world()[0] > 0:
        return True
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        tqdm.write(f"step {step}: the weights are not finite; {tc.out_dir}/ckpt.pt is not overwritten")
        return False
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "model_config": dataclasses.asdict(cfg), "train_config": dataclasses.asdict(tc), "step": step,
            "best_val": best, "rng": rng}
    data._atomic_write(os.path.join(tc.out_dir, "ckpt.pt"), lambda f: torch.save(ckpt, f))
    return True


PLAIN_EVERY = 20  # seconds between progress lines when the output is not a terminal


class Progress:
    """What a run shows, from rank 0 alone: its first line, the bar, DIR/log.jsonl, evaluations and samples."""

    def __init__(self, tc, cfg, model, device, dtype, train_b, step):
        heads = ("generator.", "disc.", "sbo.")  # the encoder's size is the model's; the generator and heads apart
        self.n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(heads))
        extra = model.num_params() - self.n_params
        print(f"MPNext {mpnext.recipe(cfg)} | {self.n_params / 1e6:.2f}M params"
              f"{f' (+{extra / 1e6:.2f}M generator/heads)' if extra else ''} | {device} {str(dtype).split('.')[-1]} | "
              f"{len(train_b.stream) / 1e6:.2f}M train tokens | steps {step}->{tc.max_steps}", flush=True)
        self.tc, self.t0, self.t_last, self.t_print, self.tokens, self.tok_last = tc, *[time.time()] * 3, 0, 0
        self.log = data.open_log(tc.out_dir, step, world()[0])
        self.bar = tqdm(total=tc.max_steps, initial=step, dynamic_ncols=True, disable=None if world()[0] == 0 else True)

    def step(self, step, loss, metrics, optimizer, tokens):
        self.tokens += tokens
        self.bar.update(1)
        if step % self.tc.log_every and step != self.tc.max_steps:
            return
        now, group = time.time(), optimizer.param_groups[0]
        lr = optimizer.scheduled_lr(group, step) if isinstance(optimizer, mpnext.Ranger21) else group["lr"]
        tok_s = (self.tokens - self.tok_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tok_last = now, self.tokens
        row = {"step": step, **{k: v.item() for k, v in metrics.items()}, "loss": loss.item(), "lr": lr,
               "tok_s": round(tok_s)}  # torchrun: metrics are rank 0's
        self.log.write(json.dumps(row) + "\n")
        heads = {k: f"{row[k]:.2f}" for k in ("gen_acc", "disc_auc", "disc_recall", "sbo_loss") if k in row}
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", **heads, lr=f"{lr:.2e}", tok_s=f"{tok_s / 1e3:.1f}k")
        if self.bar.disable and now - self.t_print >= PLAIN_EVERY:  # no terminal, no bar: a job's log shows progress
            self.t_print = now
            print(f"step {step}/{self.tc.max_steps} | {self.bar.postfix}", flush=True)

    def evaluation(self, step, loss, ev, samples):
        self.log.write(json.dumps({"step": step, "loss": loss.item(), **ev}) + "\n")
        tqdm.write(f"step {step}: {score_line(ev)}")
        if not math.isfinite(ev["val_loss"]):  # a poisoned model never overwrites the last good checkpoint
            tqdm.write(f"step {step}: validation loss not finite; {self.tc.out_dir}/ckpt.pt is not overwritten")
        elif samples:
            tqdm.write(samples())

    def close(self):
        self.bar.close()
        self.log.close()
        return (time.time() - self.t0) / 60, self.tokens


def train(tc, cfg, tok, device, train_b, val_b, ckpt=None, init_state=None):
    """Pre-train to tc.max_steps. Returns (model, last evaluation, exit status: 0; 1 after persistent non-finite
    losses; 128 + signal after Ctrl-C or SIGTERM, with a checkpoint saved)."""
    model, optimizer, scaler, gens, step, best = build(tc, cfg, device, ckpt, init_state)
    dtype = pick_dtype(tc.dtype, device)
    autocast, loss_fn = autocast_for(device, dtype), loss_function(model, cfg, device, tc.compile)
    update, save = Updater(model, optimizer, scaler, tc.grad_clip), functools.partial(
        save_checkpoint, tc, cfg, model, optimizer, scaler)
    progress, ev, stopping = Progress(tc, cfg, model, device, dtype, train_b, step), {}, False
    with GracefulStop() as stop:  # Ctrl-C: finish the step, then save below
        while step < tc.max_steps and not stopping:
            step_loss = 0.0
            for a, gen in enumerate(gens):  # --grad-accum micro-batches
                ids, starts = train_b.sample(gen)
                batch = mpnext.make_batch(ids, cfg, gen, starts)
                with sync_after_last(loss_fn, a, len(gens)), autocast:
                    loss, metrics = loss_fn(to_device(batch, device))
                scaler.scale(loss / tc.grad_accum).backward()
                step_loss += loss.detach() / tc.grad_accum
            step_loss, stopping = agree(step_loss, stop.signum is not None)  # torchrun: every process alike
            update(step_loss, learning_rate(tc, step), step + 1)
            step += 1
            if update.gave_up:
                break
            progress.step(step, step_loss, metrics, optimizer, len(gens) * ids.numel() * world()[1])
            if step % tc.eval_every == 0 or step == tc.max_steps:
                rng = rng_states(gens, device)  # every process takes part; then rank 0 evaluates and saves
                if world()[0] == 0:
                    with mpnext.SlowWeights(optimizer):  # Lookahead: evaluate the slow weights (then the fast again)
                        ev = evaluate(model, val_b, cfg, tc, device, autocast)
                    best = min(best, ev["val_loss"])
                    progress.evaluation(step, step_loss, ev, tc.samples and (
                        lambda: fill_in_samples(model, tok, val_b, cfg, device, tc.samples)))
                    if math.isfinite(ev["val_loss"]):
                        save(step, best, rng)
            elif tc.save_every and step % tc.save_every == 0 and update.bad == 0:  # never right after a NaN
                save(step, best, rng_states(gens, device))
    minutes, tokens = progress.close()
    if update.gave_up:
        print(f"error: the loss or the gradients were not finite for {update.bad} steps in a row (up to step {step}); "
              f"{tc.out_dir}/ckpt.pt is untouched. Lower --lr, or try --dtype float32", file=sys.stderr)
        return model, ev, 1
    if stopping and step < tc.max_steps:
        done = update.bad == 0 and save(step, best, rng_states(gens, device))
        launcher = f"torchrun --nproc-per-node {os.environ['LOCAL_WORLD_SIZE']}" if torchrun() else "python"
        print(f"stopped at step {step} of {tc.max_steps}; {tc.out_dir}/ckpt.pt holds step "
              f"{step if done else 'of the last good checkpoint'}. Continue with:\n"
              f"  {launcher} train.py --out-dir {tc.out_dir} --resume", flush=True)
        return model, ev, 128 + (stop.signum or signal.SIGTERM)  # the shell's status for a process ended by it
    if ev:
        print(f"summary | {mpnext.recipe(cfg)} | params {progress.n_params / 1e6:.2f}M | {device} | "
              f"{minutes:.1f} min | {tokens / max(minutes * 60, 1e-9) / 1e3:.1f}k tok/s | {score_line(ev)}")
    return model, ev, 0 if math.isfinite(ev.get("val_loss", 0.0)) else 1


def main(argv=None):
    try:
        if torchrun():  # rank 0 trains the tokenizer and writes the token caches, then the rest read them
            start_processes()
            if world()[0] > 0:
                dist.barrier()
        run = setup(argv)
    except ValueError as e:  # user mistakes (data.DataError is one too): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while reading the corpus or training the tokenizer
        print("\nstopped (Ctrl-C) before training began: nothing to resume; run the command again", file=sys.stderr)
        return 128 + signal.SIGINT
    if torchrun() and world()[0] == 0:
        dist.barrier()
    model, _, status = train(*run)
    if status == 0 and run[0].export_hf and world()[0] == 0:
        data.export_hf(model.cpu(), run[2], run[0].export_hf)
    if torchrun():  # leave together: Gloo can abort a process that tears down while another still runs
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
