"""
Side-by-side timings: python -m lab bench [--rows hf,mlm,mpnet,forward] [pre-training flags: --preset, --init ...]

The tokenizer on the corpus, then a full training step (forward, backward, AdamW) of each objective and head on the
same batch, beside Hugging Face's MPNetForMaskedLM when installed, then the encoder's forward on a task's sentences
(the lab's inference) beside transformers' MPNetModel with the same weights; in each precision the device runs
natively, each as a share of the matmul peak measured in turns with it. Results: lab/README.md, "Speed".
"""

import dataclasses
import math
import platform
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import mpnext
import train
from lab import ShowDefaults, infer, tasks


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


BENCH_VARIANTS = [dict(objective="mlm"), dict(objective="plm"), dict(objective="mpnet"),
                  dict(objective="mlm", rtd=True),
                  dict(objective="mpnet", rtd=True), dict(objective="mpnet", masking="span", sbo=True)]
BENCH_ROWS = ["hf", "mlm", "plm", "mpnet", "mlm+rtd", "mpnet+rtd", "mpnet+span+sbo", "forward"]  # --rows names


def bench_dtypes(tc, device):
    """An explicit --dtype: that precision alone; else float32 and bf16 where native."""
    if tc.dtype != "auto":
        return [train.pick_dtype(tc.dtype, device)]
    return [torch.float32] + ([torch.bfloat16] if train.native_bf16(device) else [])


def benchmark(tc, cfg, device, train_b, only=None, steps=10):
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
    print(f"tokenizer | {mb:.2f} MB | train {fresh.vocab_size} vocab: {t1 - t0:.1f} s | "
          f"encode: {mb / (t2 - t1):.1f} MB/s")
    ids, starts = train_b.sample(torch.Generator().manual_seed(tc.seed))
    mlm = mpnext.make_batch(ids, mpnext.mlm_probe(cfg), torch.Generator().manual_seed(0), starts)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def measure(model, loss_fn, batch, autocast, peak):
        """(seconds per step, model FLOPs per step, peak MB on CUDA, matmul peak FLOP/s timed in turns with it) of a
        full training step; peak = (a matmul call, its FLOPs)."""
        model.to(device).train()
        batch = train.to_device(batch, device)
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

    plain = dict(masking="token", rtd=False, sbo=False)
    variants = [dataclasses.replace(cfg, **{**plain, **v}) for v in BENCH_VARIANTS]
    variants = [v for v in variants if only is None or mpnext.recipe(v) in only]
    dtypes = bench_dtypes(tc, device)
    print(f"training step | {device_name(device)} ({device}) | batch {ids.shape[0]} x {ids.shape[1]} tokens | "
          f"fastest of {steps} steps{' | torch.compile' if tc.compile else ''} | model FLOPs = 3 x forward matmul "
          f"FLOPs")
    for dtype in dtypes:
        autocast, name = train.autocast_for(device, dtype), str(dtype).split(".")[-1]
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
                print(f"  MPNext {mpnext.recipe(vcfg)}: skipped ({e})")
                continue
            rows[f"MPNext {mpnext.recipe(vcfg)}"] = measure(model, lambda m, b: m.loss(b)[0], batch, autocast, peak) + (
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


def forward_rows(model, tok, device, dtypes, task, steps, n=256):
    """Encoder forward (no gradient) on n sentences of a task, real tokens/s: MPNext and transformers' MPNetModel
    with the same weights, each on batches of 32 in text order (the lab's inference before length grouping) and on
    length-grouped batches (infer.length_batches), in each precision; the mean pooling of the probe included. (A
    whole task, grouped, pads less: n sentences fill few batches, each spanning more lengths.)"""
    texts = tasks.load_task(task).splits
    texts = [t for s in tasks.SPLITS for t in texts[s][0]]
    texts = [texts[i] for i in torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:n].tolist()]
    rows = tasks.encode_examples(texts, tok, min(128, model.cfg.max_len))
    n_tok = sum(map(len, rows))
    try:
        import transformers
        with tempfile.TemporaryDirectory() as d:
            model.to_hf(d)
            hf = transformers.MPNetModel.from_pretrained(d).eval()
    except ImportError:
        hf = None
        print("  transformers is not installed: no HF reference row")
    encoders = {"MPNext encode": lambda ids, m: mpnext.pool(model.encode(ids, m), m, "mean")}
    if hf is not None:
        encoders["HF MPNetModel"] = lambda ids, m: mpnext.pool(hf(input_ids=ids, attention_mask=m)[0], m, "mean")
    in_order = [list(range(i, min(i + 32, len(rows)))) for i in range(0, len(rows), 32)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"encoder forward | {device_name(device)} ({device}) | {len(rows)} sentences of {task or 'the stdlib task'}, "
          f"{n_tok} tokens | fastest of {steps} passes | real tokens/s (padding not counted)")
    results = []
    for dtype in dtypes:
        autocast, peak = train.autocast_for(device, dtype), matmul_peak(device, dtype, sync)
        for (name, fn), (how, batches) in ((e, b) for b in (("in order", in_order), ("grouped", None))
                                           for e in reversed(encoders.items())):
            batches = batches or infer.length_batches([len(r) for r in rows])

            @torch.no_grad()
            def run():
                for idx in batches:
                    with autocast:
                        fn(*infer.padded(rows, idx, tok.pad_id, device))
            with FlopCounterMode(display=False) as counter:
                run()
            seconds, peak_seconds = fastest(steps, sync, run, peak[0])
            padding = 1 - n_tok / sum(len(idx) * max(len(rows[i]) for i in idx) for idx in batches)
            results.append((f"{str(dtype).split('.')[-1]:<9} {name:<14} {how:<9}", seconds, [
                f"{n_tok / seconds / 1e3:6.1f}k tok/s", f"padding {padding:4.0%}",
                f"{counter.get_total_flops() / seconds / (peak[1] / peak_seconds):4.0%} of peak"]))
    ref = next((sec for row, sec, _ in results if row.split() == ["float32", "HF", "MPNetModel", "grouped"]), None)
    for row, seconds, cells in results:
        print(f"  {row}" + " | ".join(cells + ([f"{ref / seconds:.2f}x HF float32 grouped"] if ref else [])))


def bench(argv=None):
    p = train.OneLineParser(prog="python -m lab bench", formatter_class=ShowDefaults,
                            description="Time one training step of each objective and "
                            "head side by side. Every other flag is a pre-training flag (python train.py --help) and "
                            "sets the model, the batch, the corpus and the device.")
    p.add_argument("--rows", default="", help=f"comma-separated rows to time, of {','.join(BENCH_ROWS)}; default all")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row; the fastest counts")
    p.add_argument("--task", default="", help="the forward row's sentences: a task path (as finetune --data); "
                   "default the stdlib task")
    args, pretrain = p.parse_known_args(argv)
    only = set(args.rows.split(",")) if args.rows else None
    if only and not only <= set(BENCH_ROWS):
        raise ValueError(f"--rows {args.rows}: unknown {sorted(only - set(BENCH_ROWS))}; choose from "
                         f"{','.join(BENCH_ROWS)}")
    train.check_ranges(args, {"steps": train.AT_LEAST_1})
    if "out_dir" not in train.parse_args(pretrain)[0]:  # the tokenizer and the token caches; nothing is trained
        pretrain = pretrain + ["--out-dir", "out-bench"]
    tc, cfg, tok, device, train_b, _, _, init_state = train.setup(pretrain)
    if only is None or only - {"forward"}:
        benchmark(tc, cfg, device, train_b, only, args.steps)
    if only is None or "forward" in only:
        model = mpnext.MPNext(cfg)
        model.load_state_dict(init_state or {}, strict=False)  # --init's weights; else a random model of the preset
        forward_rows(model.to(device).eval(), tok, device, bench_dtypes(tc, device), args.task or None, args.steps)
    return None, 0
