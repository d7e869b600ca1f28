"""
Fine-tuning and the probe: python -m lab finetune [--init RUN_DIR] [--data TASK] [--probe]

Fine-tuning follows MPNet Sec. 3.3 (as RoBERTa, arXiv 1907.11692): the encoder in natural order, a classifier on the
pooled last layer, AdamW with 6% warmup then linear decay, early stopping on dev accuracy. --probe freezes the encoder
and fits lab/probe.py's logistic regression on its mean-pooled features instead (SentEval, arXiv 1803.05449).
"""

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data
import mpnext
import train
from lab import infer, probe, tasks


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
    cache: bool = True  # --probe: reuse the features these weights gave these texts before (~/.cache/mpnext/features)
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
    device: str = "auto"  # auto: cuda, else mps, else cpu
    dtype: str = "auto"  # as for pre-training
    compile: bool = False  # torch.compile the loss


def finetune_flags(argv, prog="python -m lab finetune"):
    """FinetuneConfig from a command line, and the flags given; every check that needs no data."""
    p = train.OneLineParser(prog=prog, description="Fine-tune or probe a model on a classification task.")
    train.add_fields(p, FinetuneConfig)
    typed = vars(p.parse_args(argv))  # only the flags given (add_fields: SUPPRESS)
    fc = FinetuneConfig(**typed)
    train.check_ranges(fc, {**dict.fromkeys(("epochs", "patience", "batch_size"), train.AT_LEAST_1),
                            "lr": (lambda v: 0 <= v < 1, "in [0, 1) (0 = auto)"), "weight_decay": train.NOT_NEGATIVE,
                            "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
                            "train_size": (train.NOT_NEGATIVE[0], "0 (all) or more"),
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
    if fc.init:
        data.check_init(fc.init)  # the input before the output: a mistyped path is refused at once
    data.check_out_dir(fc.out_dir, "--out-dir")
    if os.path.exists(os.path.join(fc.out_dir, "ckpt.pt")):
        raise ValueError(f"{fc.out_dir} already holds a fine-tuned model: to fine-tune again, pass another --out-dir "
                         f"(or delete that one)")
    task = tasks.load_task(fc.data or None, fc.split_seed, fc.train_size, fc.label_col, fc.text_cols)
    state = None
    if fc.init:  # a pre-training (or fine-tuning) run directory, or a Hugging Face MPNet checkpoint
        cfg, state, tok = data.read_init(fc.init)
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
        if any(not k.startswith(("classifier.", "head_")) for k in missing):  # (a sentence encoder has no LM head)
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
    device = train.pick_device(fc.device)
    dtype = train.pick_dtype(fc.dtype, device)
    autocast, model = train.autocast_for(device, dtype), model.to(device)
    rows = {s: tasks.encode_examples(t, tok, fc.max_len) for s, (t, _) in task.splits.items()}
    labels = {s: torch.tensor(y) for s, (_, y) in task.splits.items()}
    n = {s: len(v) for s, v in rows.items()}
    folds = fc.folds if fc.probe and task.pooled and not fc.train_size else 0  # a given split is kept as given
    protocol = f"probe, {folds}-fold CV" if folds else "probe" if fc.probe else "finetune"
    print(f"{task.name}: {len(task.labels)} classes | train {n['train']} dev {n['dev']} test {n['test']} | "
          f"{protocol} | {source(fc)} | {device} {str(dtype).split('.')[-1]}", flush=True)

    def predict(split):
        model.eval()
        pred = infer.run_batches(model.classify, rows[split], tok.pad_id, device, autocast).argmax(-1)
        model.train()
        return pred

    t0, log, status = time.time(), open(os.path.join(fc.out_dir, "log.jsonl"), "w", buffering=1), 0
    if fc.probe:
        feats, seconds = infer.cached_features(model, rows, device, dtype, fc.cache)
        t_fit = time.time()
        if folds:  # all examples, each scored once
            res = probe.probe_cv(torch.cat(list(feats.values())), torch.cat(list(labels.values())),
                                 len(task.labels), folds, fc.split_seed)
        else:
            res = probe.probe(feats, labels, len(task.labels))
        res.pop("pred"), res.pop("fold", None)
        res.update(features_s="cached" if seconds is None else round(seconds, 1), fit_s=round(time.time() - t_fit, 1))
    else:  # epochs with early stopping on dev accuracy; the best epoch's weights are saved and scored on test
        total = fc.epochs * math.ceil(n["train"] / fc.batch_size)
        optimizer = mpnext.build_optimizer(model, "adamw", lr=fc.lr, weight_decay=fc.weight_decay, betas=(0.9, 0.98),
                                           eps=1e-6)
        scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
        update = train.Updater(model, optimizer, scaler, clip=1.0)
        loss_fn = torch.compile(model.loss) if fc.compile else model.loss
        gen = torch.Generator().manual_seed(fc.seed)
        step, best, best_epoch, t_print, t_train = 0, -1.0, 0, time.time(), time.time()
        bar = tqdm(total=total, dynamic_ncols=True, disable=None)  # its estimate counts every epoch; early stopping
        lengths = [len(r) for r in rows["train"]]  # may end sooner
        with train.GracefulStop() as stop:
            for epoch in range(1, fc.epochs + 1):
                for idx in infer.grouped_epoch(lengths, fc.batch_size, gen):
                    ids, mask = infer.padded(rows["train"], idx, tok.pad_id, device)
                    batch = {"kind": "cls", "input_ids": ids, "attention_mask": mask,
                             "labels": labels["train"][idx].to(device)}
                    with autocast:
                        loss, metrics = loss_fn(batch)
                    scaler.scale(loss).backward()
                    update(loss, fc.lr * mpnext.lr_multiplier(step, round(0.06 * total), total), step + 1)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
                    if bar.disable and time.time() - t_print >= train.PLAIN_EVERY:  # no terminal: a plain line
                        t_print = time.time()
                        left = (time.time() - t_train) / step * (total - step) / 60  # evaluations included
                        print(f"step {step}/{total} | epoch {epoch} | loss {loss.item():.3f} | at most {left:.1f} "
                              f"min left", flush=True)
                    if stop.signum is not None or update.gave_up:
                        break
                dev_acc = (predict("dev") == labels["dev"]).float().mean().item()
                log.write(json.dumps({"epoch": epoch, "step": step, "loss": loss.item(), "dev_acc": dev_acc}) + "\n")
                best_mark = " (best)" * (dev_acc > best)
                tqdm.write(f"epoch {epoch}: loss {loss.item():.3f} dev_acc {dev_acc:.4f}{best_mark}")
                if dev_acc > best:
                    best, best_epoch = dev_acc, epoch
                    ckpt = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
                            "finetune_config": dataclasses.asdict(fc), "epoch": epoch, "dev_acc": dev_acc,
                            "labels": task.labels}
                    data._atomic_write(os.path.join(fc.out_dir, "ckpt.pt"), lambda f: torch.save(ckpt, f))
                if update.gave_up:
                    print(f"error: the loss or the gradients were not finite for {update.bad} steps in a row; scoring "
                          f"the best epoch so far ({best_epoch}). Lower --lr, or try --dtype float32", file=sys.stderr)
                    status = 1
                    break
                if stop.signum is not None:
                    print(f"stopped in epoch {epoch}; scoring the best epoch so far ({best_epoch})", flush=True)
                    status = 128 + stop.signum
                    break
                if epoch - best_epoch >= fc.patience:
                    break
        bar.close()
        model.load_state_dict(data.read_run(fc.out_dir)["model"])
        pred = predict("test")
        res = {"dev_acc": best, "test_acc": (pred == labels["test"]).float().mean().item(),
               "test_f1": probe.macro_f1(pred, labels["test"], cfg.n_classes), "best_epoch": best_epoch}
    res.update(task=task.name, protocol=protocol, n_train=n["train"], minutes=(time.time() - t0) / 60)
    log.write(json.dumps(res) + "\n")
    log.close()
    split = f" (features {res['features_s']}{'' if res['features_s'] == 'cached' else ' s'}, regression " \
        f"{res['fit_s']} s)" if fc.probe else ""
    print(f"summary | {task.name} | {res['protocol']} | {source(fc)} | test_acc {res['test_acc']:.4f} "
          f"test_f1 {res['test_f1']:.4f} | dev_acc {res['dev_acc']:.4f} | {res['minutes']:.1f} min{split} | in "
          f"{fc.out_dir}")
    return res, status
