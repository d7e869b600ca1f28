"""
The combination lab: python -m lab compare --cells "A | B" --grid "flag=v1,v2" --seeds 3 --tasks T1,T2

Pre-trains every cell of a grid on the same budget (steps, tokens or minutes), then probes and/or fine-tunes each on
a list of tasks over several seeds, beside a random-init row (with --init: the checkpoint as it is, no further
pre-training: task-adaptive pre-training, arXiv 2004.10964); writes results.csv, results.md and compare.png.
Resumable: each cell's runs live in OUT/runs/, and a rerun skips the rows results.csv holds.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import shutil
import sys
import time

import data
import mpnext
import train
from lab import ShowDefaults
from lab import tasks as tasks_
from lab.bench import device_name
from lab.finetune import finetune, finetune_flags


COMPARE_SETS = {"seed", "out_dir", "resume"}  # pre-training flags compare sets for each run itself


def compare_args(argv):
    p = train.OneLineParser(prog="python -m lab compare", formatter_class=ShowDefaults, description="Pre-train every "
                            "cell of a grid on the same budget, then probe / fine-tune each on a list of tasks over "
                            "several seeds. Other flags go to pre-training.")
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
    p.add_argument("--no-random", action="store_true", help="leave out the random-init row (with --init: the row of "
                   "the checkpoint as it is)")
    p.add_argument("--tokens", type=float, default=0, help="budget in place of --max-steps: pre-training tokens per "
                   "cell (its steps = tokens / (batch x seq-len)), for grids over --batch-size or --seq-len")
    p.add_argument("--minutes", type=float, default=0, help="budget in place of --max-steps: minutes of training "
                   "steps per cell, its steps set from a 60-step timing run of that cell (fast recipes get more steps)")
    p.add_argument("--out-dir", default="out-compare", help="runs/, results.csv, results.md (and compare.png)")
    args, pretrain = p.parse_known_args(argv)
    names = {f.name: f.type for cls in (train.TrainConfig, mpnext.MPNextConfig) for f in dataclasses.fields(cls)}

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
    train.check_ranges(args, {"seeds": train.AT_LEAST_1, "low_size": train.AT_LEAST_1, "tokens": train.NOT_NEGATIVE,
                              "minutes": train.NOT_NEGATIVE})
    data.check_out_dir(args.out_dir, "--out-dir")
    if len(set(specs)) < len(specs):
        raise ValueError(f"--cells/--grid: a cell appears twice ({specs}); remove the duplicate")
    given = train.parse_args(pretrain)[0].keys()
    if given & COMPARE_SETS:
        raise ValueError(f"compare sets {sorted(given & COMPARE_SETS)} of each run itself (seeds 0..--seeds-1); "
                         f"drop them")
    if bool(args.tokens) + bool(args.minutes) + ("max_steps" in given) > 1:
        raise ValueError("compare: pass one budget, --max-steps, --tokens or --minutes")
    for name in ("max_steps", "batch_size", "seq_len"):  # the budget written out: a later default cannot change it
        if name not in given and not (name == "max_steps" and (args.tokens or args.minutes)):
            pretrain = pretrain + ["--" + name.replace("_", "-"), str(getattr(train.TrainConfig, name))]
    grid = [(spec or "default", flags(spec)) for spec in specs]
    if args.tokens:  # equal tokens: each cell's steps from its own batch x sequence length
        grid = [(cell, extra + ["--max-steps", str(max(1, round(args.tokens / math.prod(
            pretrain_value(pretrain + extra, k) for k in ("batch_size", "seq_len")))))]) for cell, extra in grid]
    for cell, extra in grid:  # every cell's command line must pass its checks before hours of work start
        train_args, model_args = train.parse_args(pretrain + extra)
        if not train_args.get("init"):
            tc = train.TrainConfig(**train_args)
            try:
                train.check_run(tc, mpnext.MPNextConfig.from_preset(tc.preset, tc.seq_len, **model_args))
            except ValueError as e:
                raise ValueError(f"cell {cell!r}: {e}") from None
    if any(not t.strip() for t in args.tasks.split(",")):
        raise ValueError(f"--tasks {args.tasks!r}: an empty task name; separate paths with commas")
    tasks = [(t, None if t == "builtin" else t) for t in args.tasks.split(",")]
    try:
        fc, typed = finetune_flags(shlex.split(args.finetune), prog="python -m lab compare --finetune")
    except ValueError as e:  # shlex: "No closing quotation"; or a value out of range
        raise ValueError(f"--finetune {args.finetune!r}: {e}") from None
    own = typed.keys() & {"init", "random_init", "out_dir", "data", "seed", "probe", "train_size"}
    if own:
        raise ValueError(f"--finetune: compare sets {sorted(own)} for each run itself; drop them")
    for t, path in tasks:  # a bad task fails now, with its one line
        tasks_.load_task(path, fc.split_seed, args.low_size if "low" in protocols else 0, fc.label_col, fc.text_cols)
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
    init = pretrain_value(pretrain, "init")  # the baseline row: with --init, the checkpoint without more pre-training
    cells = grid + ([] if args.no_random else [("no adaptation" if init else "random init", None)])

    def run_dir_of(cell, seed):
        return os.path.join(args.out_dir, "runs", f"{slug(cell)}-s{seed}")
    # seeds outermost: an interrupted lab holds every cell at the same number of seeds
    for seed, (cell, extra), (task, path), protocol in itertools.product(range(args.seeds), cells, tasks, protocols):
        if (cell, str(seed), task, protocol) in done:
            continue
        run_dir = run_dir_of(cell, seed)
        pre = {"val_mlm_loss": "", "pretrain_min": 0.0}
        if extra is not None:  # pre-train (or finish pre-training) the cell
            pre = pretrain_cell(pretrain + extra + ["--seed", str(seed), "--out-dir", run_dir, "--samples", "0"],
                                f"{cell} | seed {seed}")
        ft_dir = os.path.join(run_dir, f"ft-{slug(task_name(task))}-{protocol}")
        if os.path.exists(ft_dir):
            shutil.rmtree(ft_dir)  # an interrupted fine-tuning: start it again
        ft = ["--out-dir", ft_dir, "--seed", str(seed)] + (["--data", path] if path else [])
        ft += [f"--{k}={pretrain_value(pretrain, k)}" for k in ("device", "dtype")] + ["--compile"] * bool(
            pretrain_value(pretrain, "compile"))  # fine-tuning runs where and as pre-training does
        # random init: the first cell's architecture and tokenizer, fresh weights: only pre-training differs
        ft += ["--init", run_dir] if extra is not None else ["--init", init] if init else [
            "--init", run_dir_of(cells[0][0], seed), "--random-init"]
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
    tc, mc = train.parse_args(argv)
    return {**dataclasses.asdict(train.TrainConfig()), **tc, **mc}.get(name)


def pretrain_or_stop(argv):
    """One pre-training run of the grid; a stopped or failed run stops compare with its exit status."""
    status = train.train(*train.setup(argv))[2]
    if status:
        print("compare: stopped. Run the same compare command again to go on: it keeps every finished row, resumes "
              "a stopped pre-training and times an interrupted timing run again", file=sys.stderr)
        raise SystemExit(status)


def steps_for_minutes(argv, minutes, timing_dir):
    """Steps that fill `minutes` with this cell's training steps: its tokens/s over the fastest 10 of steps 11-60 of a
    timing run (the first 10 hold warm-up and compilation; the fastest window is the least disturbed on a shared
    machine, as in the bench; evaluation is not counted)."""
    shutil.rmtree(timing_dir, ignore_errors=True)
    timing = ["--max-steps", "60", "--log-every", "10", "--eval-every", "60", "--warmup-steps", "0",
              "--schedule-steps", "0", "--seed", "0", "--samples", "0", "--out-dir", timing_dir]
    print(f"\n=== timing {' '.join(argv)}", flush=True)
    pretrain_or_stop(argv + timing)
    tok_s = [json.loads(line)["tok_s"] for line in open(os.path.join(timing_dir, "log.jsonl")) if '"tok_s"' in line]
    shutil.rmtree(timing_dir)
    tokens_per_step = math.prod(pretrain_value(argv, k) for k in ("batch_size", "seq_len"))
    return max(1, int(minutes * 60 * max(tok_s[1:]) / tokens_per_step))


def pretrain_cell(argv, title):
    """Pre-train a cell to its --max-steps (resuming a stopped run); its val_mlm_loss and minutes from the log."""
    out_dir = argv[argv.index("--out-dir") + 1]
    path = os.path.join(out_dir, "ckpt.pt")
    step = data.read_run(out_dir)["step"] if os.path.exists(path) else 0
    if step < pretrain_value(argv, "max_steps"):
        print(f"\n=== {title} | pre-training", flush=True)
        pretrain_or_stop(argv + ["--resume"] * bool(step))
    evals = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl")) if '"val_loss"' in line]
    start = os.path.getmtime(os.path.join(out_dir, "train_tokens.npz"))  # written just before training starts
    return {"val_mlm_loss": evals[-1].get("val_mlm_loss", ""),
            "pretrain_min": round((os.path.getmtime(path) - start) / 60, 3)}


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def mean_pm(xs):  # "mean +- std" over seeds; one seed has no spread to show
    return "%.1f +- %.1f" % mean_std(xs) if len(xs) > 1 else "%.1f" % xs[0]


def compare_table(rows, cells, tasks, protocols, pretrain, budget, minutes):
    """Markdown: one row per cell, test accuracy (%) mean +- std over seeds per task and protocol, their average."""
    cols = [(t, p) for t, _ in tasks for p in protocols]
    device, init = train.pick_device(pretrain_value(pretrain, "device")), pretrain_value(pretrain, "init")
    model = f"init {init}" if init else f"preset {pretrain_value(pretrain, 'preset')}"
    lines = [f"Budget: {budget}, {model}, data {pretrain_value(pretrain, 'data') or 'stdlib'}; "
             f"{device_name(device)}; this call {minutes:.1f} min. Test accuracy (%), mean +- std over seeds.", "",
             "| cell | " + " | ".join(f"{task_name(t)} {p}" for t, p in cols) +
             " | average | val_mlm_loss | pre-train min |", "|---" * (len(cols) + 4) + "|"]
    for cell in cells:
        mine = [r for r in rows if r["cell"] == cell]
        cells_txt, seeds_avg = [], []
        for t, p in cols:
            acc = [100 * float(r["test_acc"]) for r in mine if r["task"] == t and r["protocol"] == p]
            cells_txt.append(mean_pm(acc) if acc else "")
        per_seed = {}
        for r in mine:
            per_seed.setdefault(r["seed"], []).append(100 * float(r["test_acc"]))
        seeds_avg = [sum(v) / len(v) for v in per_seed.values() if len(v) == len(cols)]
        loss = [float(r["val_mlm_loss"]) for r in mine if r["val_mlm_loss"] not in ("", None)]
        mins = {r["seed"]: float(r["pretrain_min"]) for r in mine}
        lines.append(f"| {cell} | " + " | ".join(cells_txt) +
                     f" | {mean_pm(seeds_avg) if seeds_avg else ''}"
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
