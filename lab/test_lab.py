"""The lab's tests: tasks, the probe, fine-tuning, compare, the benchmark, fill and export. Run with
`python -m pytest -q lab` (or with the core's: `python -m pytest -q test_mpnext.py lab`)."""

import dataclasses
import json
import os
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import data
import lab
import mpnext
import train
from lab import probe, tasks
from lab.compare import compare, compare_args
from lab.finetune import finetune, finetune_setup
from lab.use import fill, load_run
from mpnext import MPNext
from test_mpnext import HERE, TINY_ARGS, gen, make_hf_mpnet, read_log, run_train, toy_corpus

torch.set_num_threads(2)


def toy_task(path, n=240, seed=0, pair=False):
    """A separable task as a CSV: the label is which of two cue words the text holds, among random filler words
    (pair=True: the cue sits in the second text)."""
    rng = random.Random(seed)
    words = "cat dog bird fish horse king queen child farmer sailor river tree house ship garden".split()
    rows = ["a,b,label" if pair else "text,label"]
    for i in range(n):
        label = rng.choice(["yes", "no"])
        text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + f" {'alpha' if label == 'yes' else 'omega'}"
        text += "" if pair else f" {i}"
        filler = " ".join(rng.choice(words) for _ in range(5))
        rows.append(f"{filler},{text},{label}" if pair else f"{text},{label}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_load_task_formats_dedup_and_stratified_split(tmp_path):
    t = tasks.load_task(toy_task(tmp_path / "t.csv", n=200))
    assert t.labels == ["no", "yes"] and sum(len(v[0]) for v in t.splits.values()) == 200
    assert [len(t.splits[s][0]) for s in tasks.SPLITS] == [160, 20, 20]
    for s in tasks.SPLITS:  # stratified: each split has about the same share of "yes"
        texts, y = t.splits[s]
        assert abs(sum(y) / len(y) - sum(t.splits["train"][1]) / 160) < 0.1 and all(len(x) == 1 for x in texts)
    assert tasks.load_task(str(tmp_path / "t.csv"), seed=0).splits == t.splits  # seeded
    # a directory of class files; duplicates dropped, texts under two labels dropped; README is not a class
    d = tmp_path / "cls"
    d.mkdir()
    pos, neg = "good fine great super nice lovely grand neat cool sweet".split(), "bad awful poor worse ugly grim sad " \
        "vile dull mean".split()
    (d / "pos.txt").write_text("\n".join(pos + ["good", "both"]) + "\n")
    (d / "neg.txt").write_text("\n".join(neg + ["both"]) + "\n")
    (d / "README.txt").write_text("about this data\n")
    t = tasks.load_task(str(d))
    texts = [x[0] for s in tasks.SPLITS for x in t.splits[s][0]]
    assert sorted(texts) == sorted(pos + neg)
    assert t.labels == ["neg", "pos"]
    # train/dev/test files are used as named; --train-size keeps a stratified subset
    s = tmp_path / "splits"
    s.mkdir()
    for name, n in (("train", 100), ("dev", 20), ("test", 30)):
        toy_task(s / f"{name}.csv", n=n, seed=len(name))
    t = tasks.load_task(str(s), train_size=10)
    assert [len(t.splits[x][0]) for x in tasks.SPLITS] == [10, 20, 30] and 3 <= sum(t.splits["train"][1]) <= 7
    # --train-size keeps every class, in proportion, exactly n examples
    labels = ["a"] * 300 + ["b"] * 20 + ["c"] * 20
    for n, want in ((3, {"a": 1, "b": 1, "c": 1}), (34, {"a": 30, "b": 2, "c": 2}), (10, None)):
        got = Counter(labels[i] for i in tasks._subsample(labels, n, random.Random(0)))
        assert sum(got.values()) == n and set(got) == {"a", "b", "c"} and (want is None or got == want)


def test_load_task_rejects_bad_input_with_one_line(tmp_path):
    cases = {"nolabel.csv": "text,cls\na,b\nc,d\n", "one.csv": "text,label\na,x\nb,x\nc,x\nd,x\n", "empty.csv": "",
             "ragged.csv": "text,label\na,b,c\n", "tiny.csv": "text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(8))}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(data.DataError) as e:
            tasks.load_task(str(tmp_path / name))
        msg = str(e.value)
        assert "\n" not in msg and name in msg, msg
        assert {"nolabel.csv": "--label-col", "one.csv": "single class", "empty.csv": "empty",
                "ragged.csv": "line 2", "tiny.csv": "split is empty"}[name] in msg
    s = tmp_path / "unseen"
    s.mkdir()
    (s / "train.csv").write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    (s / "test.csv").write_text("text,label\nx,a\ny,c\n")
    with pytest.raises(data.DataError, match=r"test has label\(s\) \['c'\] that never occur in train"):
        tasks.load_task(str(s))
    # through the command line: status 2 and the one line; every command's --help prints
    assert lab.main(["finetune", "--data", str(tmp_path / "nolabel.csv"), "--out-dir", str(tmp_path / "o")]) == 2
    for command in ("finetune", "compare", "fill", "export"):
        with pytest.raises(SystemExit) as e:
            lab.main([command, "--help"])
        assert e.value.code == 0


def test_encode_examples_single_and_pair_format_and_truncation():
    tok = data.Tokenizer.train("hello world, this is a pair test " * 20, vocab_size=300)
    one, pair = tasks.encode_examples([("hello world",), ("hello", "world")], tok, max_len=64)
    h, w = tok.encode("hello world"), (tok.encode("hello"), tok.encode("world"))
    assert one == [tok.bos_id] + h + [tok.eos_id]
    assert pair == [tok.bos_id] + w[0] + [tok.eos_id, tok.eos_id] + w[1] + [tok.eos_id]  # <s> a </s></s> b </s>
    long = tasks.encode_examples([("hello " * 50, "world")], tok, max_len=16)[0]
    assert len(long) == 16 and long[-3:] == [tok.eos_id] + w[1] + [tok.eos_id] if len(w[1]) == 1 else len(long) == 16
    x = tasks.pad_rows([[0, 5, 2], [0, 2]], tok.pad_id)
    assert x.tolist() == [[0, 5, 2], [0, 2, tok.pad_id]]


def test_logistic_regression_meets_its_optimality_condition_and_probe_separates():
    g = gen(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = (x[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)).argmax(-1)
    lin = probe.logistic_regression(x, y, 3, l2=0.1)
    lin.zero_grad()
    (F.cross_entropy(lin(x), y) + 0.05 * lin.weight.pow(2).sum()).backward()  # the gradient vanishes at the optimum
    assert lin.weight.grad.abs().max() < 1e-6 and lin.bias.grad.abs().max() < 1e-6
    feats = {s: x[i::3] for i, s in enumerate(tasks.SPLITS)}
    labels = {s: y[i::3] for i, s in enumerate(tasks.SPLITS)}
    res = probe.probe(feats, labels, 3)
    assert res["test_acc"] > 0.85 and res["l2"] in probe.PROBE_L2
    # K-fold: every example is scored once, by a classifier that never saw it; the folds are stratified and seeded
    folds = probe.probe_cv(x, y, 3, folds=5, seed=1)
    assert folds["test_acc"] > 0.85 and folds["pred"].shape == y.shape
    assert torch.equal(folds["pred"], probe.probe_cv(x, y, 3, folds=5, seed=1)["pred"])
    for c in range(3):  # stratified: each class spread evenly over the folds
        per_fold = torch.bincount(folds["fold"][y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    moved = x.clone()
    moved[0] *= 1e3  # the classifier that scores example 0's fold never saw it: the rest of that fold scores the same
    same = folds["fold"] == folds["fold"][0]
    same[0] = False
    changed = probe.probe_cv(moved, y, 3, folds=5, seed=1)
    assert torch.equal(changed["pred"][same], folds["pred"][same]) and not torch.equal(changed["pred"], folds["pred"])
    # macro-F1 by hand: class 0 F1 = 2/3, class 1 F1 = 2/3, class 2 F1 = 1
    assert abs(probe.macro_f1(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3) - (2 / 3 + 2 / 3 + 1) / 3) < 1e-12


FT_ARGS = ["--preset", "tiny", "--vocab", "300", "--epochs", "6", "--batch-size", "16", "--max-len", "64"]


def test_finetune_and_probe_learn_a_separable_task(tmp_path, capsys):
    task = toy_task(tmp_path / "t.csv", n=300)
    res, status = finetune(["--data", task, "--out-dir", str(tmp_path / "ft"), *FT_ARGS])
    assert status == 0 and res["test_acc"] >= 0.9 and res["test_f1"] >= 0.9, res
    log = read_log(tmp_path / "ft")
    assert log[-1]["test_acc"] == res["test_acc"] and "dev_acc" in log[0]
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["n_classes"] == 2 and ckpt["dev_acc"] == res["dev_acc"]
    assert (tmp_path / "ft" / "tokenizer.json").exists()
    assert "summary | t | finetune | random init | test_acc" in capsys.readouterr().out
    # the pair task: loads, trains, and the cue in the second text is found
    pair = toy_task(tmp_path / "p.csv", n=400, pair=True)
    res, _ = finetune(["--data", pair, "--out-dir", str(tmp_path / "fp"), *FT_ARGS])
    assert res["test_acc"] >= 0.8, res
    # the frozen probe of a random encoder: mean-pooled embeddings already carry the cue word
    res, _ = finetune(["--data", task, "--out-dir", str(tmp_path / "pr"), "--probe", *FT_ARGS])
    assert res["test_acc"] >= 0.9 and res["protocol"] == "probe, 10-fold CV"  # one pool: SentEval's CV
    res, _ = finetune(["--data", task, "--out-dir", str(tmp_path / "pr0"), "--probe", "--folds", "0", *FT_ARGS])
    assert res["test_acc"] >= 0.9 and res["protocol"] == "probe"  # the seeded train/dev/test split
    # a run directory is never overwritten
    assert lab.main(["finetune", "--data", task, "--out-dir", str(tmp_path / "ft"), *FT_ARGS]) == 2


def test_finetune_from_a_pretraining_run_loads_its_encoder(tmp_path):
    out = run_train(tmp_path, "--max-steps", "4", "--rtd", "--masking", "span", "--sbo")
    task = toy_task(tmp_path / "t.csv", n=120)
    fc, cfg, model, tok, t = finetune_setup(["--init", str(out), "--data", task, "--out-dir",
                                             str(tmp_path / "ft"), "--max-len", "32"])
    pre = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])
    assert not hasattr(model, "generator") and not hasattr(model, "sbo") and cfg.n_classes == 2
    assert tok.merges == data.Tokenizer.load(out / "tokenizer.json").merges and fc.lr == 1e-3  # 2e-5 x (768 / 64)^2, capped at 1e-3
    # --random-init: the same architecture and tokenizer, fresh weights (the lab's baseline)
    _, cfg2, fresh, tok2, _ = finetune_setup(["--init", str(out), "--random-init", "--data", task, "--out-dir",
                                              str(tmp_path / "ft2"), "--max-len", "32"])
    assert cfg2 == cfg and tok2.merges == tok.merges
    assert not torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])


def test_compare_writes_the_table_and_skips_finished_cells(tmp_path, capsys):
    corpus = toy_corpus(tmp_path / "corpus")
    task = toy_task(tmp_path / "t.csv", n=120)
    argv = ["--cells", "objective=mlm | objective=mpnet", "--seeds", "2", "--tasks", task, "--finetune",
            "--max-len 32", "--out-dir", str(tmp_path / "cmp"), "--data", corpus, *TINY_ARGS,
            "--samples", "0", "--max-steps", "3", "--eval-every", "3", "--warmup-steps", "1"]
    rows, status = compare(argv)
    assert status == 0 and len(rows) == 6  # 2 cells + random init, 2 seeds, one task, one protocol
    table = (tmp_path / "cmp" / "results.md").read_text()
    for cell in ("objective=mlm", "objective=mpnet", "random init"):
        assert f"| {cell} | " in table
    assert "+-" in table and "Budget: 3 steps x 8 x 32 tokens" in table
    try:
        import matplotlib  # noqa: F401  (optional: the picture only when it is installed)
        assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    except ImportError:
        assert not (tmp_path / "cmp" / "compare.png").exists()
    capsys.readouterr()
    rows2, _ = compare(argv)  # a rerun does nothing but redraw the table
    assert len(rows2) == 6 and "===" not in capsys.readouterr().out
    assert len((tmp_path / "cmp" / "results.csv").read_text().strip().splitlines()) == 7
    assert lab.main(["compare", *argv[:-6], "--max-steps", "4", "--eval-every", "4"]) == 2  # another budget
    assert "holds results of other pre-training" in capsys.readouterr().err
    _, pretrain, *_ = compare_args(["--tasks", task, "--out-dir", str(tmp_path / "cmp2"), "--data", corpus])
    tc = train.TrainConfig()  # the budget is written out, so a later change of a default cannot alter a grid
    assert pretrain[2:] == ["--max-steps", str(tc.max_steps), "--batch-size", str(tc.batch_size), "--seq-len",
                            str(tc.seq_len)]


def test_compare_budgets_in_tokens_and_minutes(tmp_path, capsys):
    corpus = toy_corpus(tmp_path / "corpus")
    task = toy_task(tmp_path / "t.csv", n=120)
    common = ["--seeds", "1", "--tasks", task, "--no-random", "--finetune", "--max-len 32 --folds 0", "--data", corpus,
              *TINY_ARGS, "--samples", "0", "--eval-every", "1000", "--warmup-steps", "1"]
    # equal tokens: a cell with half the sequence length gets twice the steps
    rows, status = compare(["--grid", "seq_len=32,16", "--tokens", "1024", "--out-dir", str(tmp_path / "tok"),
                            *common])
    assert status == 0 and len(rows) == 2
    steps = [data.read_run(str(tmp_path / "tok" / "runs" / f"seq_len={n}-s0"))["step"] for n in (32, 16)]
    assert steps == [4, 8]  # 1024 tokens / (8 x 32), / (8 x 16)
    assert "Budget: 1,024 tokens per cell (steps: seq_len=32 4, seq_len=16 8)" in (tmp_path / "tok" / "results.md"
                                                                                   ).read_text()
    # equal minutes: a cell's steps from its own timing run, kept in steps.json, so a rerun times nothing again
    argv = ["--cells", "objective=mpnet", "--minutes", "0.01", "--out-dir", str(tmp_path / "min"), *common]
    rows, status = compare(argv)
    timed = json.loads((tmp_path / "min" / "steps.json").read_text())
    assert status == 0 and list(timed) == ["objective=mpnet"] and timed["objective=mpnet"] >= 1
    for cell, n in timed.items():
        assert data.read_run(str(tmp_path / "min" / "runs" / f"{cell}-s0"))["step"] == n
        assert not (tmp_path / "min" / "runs" / f"{cell}-timing").exists()
    results = (tmp_path / "min" / "results.md").read_text()
    assert "0.01 minutes of training steps per cell (steps: objective=mpnet" in results
    capsys.readouterr()
    compare(argv)
    assert "=== timing" not in capsys.readouterr().out and json.loads((tmp_path / "min" / "steps.json").read_text()
                                                                      ) == timed
    for extra in (["--minutes", "1", "--tokens", "1e6"], ["--minutes", "1", "--max-steps", "5"], ["--tokens", "-1"]):
        assert lab.main(["compare", "--tasks", task, "--out-dir", str(tmp_path / "bad"), *extra]) == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_finetune_skips_non_finite_steps_and_stops_when_they_persist(tmp_path, monkeypatch, capsys):
    task = toy_task(tmp_path / "t.csv", n=120)
    real_loss = MPNext.loss

    def poisoned(self, batch):
        loss, m = real_loss(self, batch)
        return loss * float("nan"), m

    monkeypatch.setattr(MPNext, "loss", poisoned)
    res, status = finetune(["--data", task, "--out-dir", str(tmp_path / "ft"), *FT_ARGS])
    assert status == 1 and "not finite for 5 steps in a row" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)  # the (untouched) weights were scored
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values()) and 0 <= res["test_acc"] <= 1


def test_fill_prints_completions(tmp_path, capsys):
    out = run_train(tmp_path, "--max-steps", "4")
    model, tok = load_run(str(out))
    assert not model.training and model.cfg.vocab_size == tok.vocab_size
    capsys.readouterr()
    results, status = fill(["--init", str(out), "--top-k", "3", "The <mask> sees the <mask>."])
    printed = capsys.readouterr().out
    assert status == 0 and len(results) == 1 and len(results[0]) == 2 and len(results[0][0]) == 3
    assert "<mask> 1:" in printed and "<mask> 2:" in printed
    probs = [p for _, p in results[0][0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    # BERT's [MASK] is read as <mask>; a text breaks one rule or the other, and the message says which
    assert fill(["--init", str(out), "--top-k", "3", "The [MASK] sees the <mask>."])[0] == results
    capsys.readouterr()
    for text, why in (("no mask here", "no blank in it; write each blank as <mask>"),
                      ("<mask> " + "word " * 200, "tokens, more than the model's")):
        assert lab.main(["fill", "--init", str(out), text]) == 2
        assert why in capsys.readouterr().err
    assert lab.main(["fill", "--init", str(tmp_path / "nothing"), "a <mask>"]) == 2


def test_export_hf_with_tokenizer_pipeline_and_identical_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = run_train(tmp_path, "--max-steps", "4", "--export-hf", str(tmp_path / "hf"))
    model, tok = load_run(str(out))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    mixed = ("Héllo wörld — naïve café 😀🎉 日本語 12345 3.14159 1,000,000\t\ttabs  and   spaces\n\n\nnew lines "
             "it's we'll \u00a0nbsp e\u0301 Ωμέγα __init__ x=y+z; #hash $5.00 ﬁ \r\n ٣٤٥ ½ ² ") * 20
    mixed += open(os.path.join(HERE, "README.md"), encoding="utf-8").read()[:3000]
    assert hf_tok(mixed, add_special_tokens=False)["input_ids"] == tok.encode(mixed)
    assert hf_tok("the <mask> sat")["input_ids"] == [tok.bos_id] + tok.encode("the <mask> sat", specials=True) + [2]
    assert hf_tok("a", "b")["input_ids"] == tasks.encode_examples([("a", "b")], tok, 64)[0]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.hidden_dropout_prob == 0.1  # the tiny run had none: fine-tuning gets MPNet's 0.1
    ids = torch.tensor([[tok.bos_id] + tok.encode("The old cat sees the <mask>.", specials=True) + [tok.eos_id]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-5)
    answers = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"))("The old cat sees the <mask>.")
    assert len(answers) == 5 and all("score" in a for a in answers)
    # a fine-tuned run goes out as MPNetForSequenceClassification with its label names
    task = toy_task(tmp_path / "t.csv", n=80)
    finetune(["--init", str(out), "--data", task, "--out-dir", str(tmp_path / "ft"), "--epochs", "1",
             "--max-len", "32"])
    assert lab.main(["export", "--init", str(tmp_path / "ft"), str(tmp_path / "hf-ft")]) == 0
    clf = transformers.pipeline("text-classification", model=str(tmp_path / "hf-ft"))("The old cat alpha")
    assert clf[0]["label"] in ("no", "yes")
    ft_model, _ = load_run(str(tmp_path / "ft"))
    hf_clf, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf-ft",
                                                                                   output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info  # no LM head goes out with a classifier
    hf_clf.eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(hf_clf(ids, attention_mask=mask).logits, ft_model.classify(ids, mask), atol=1e-5)
    # models HF cannot hold are refused (before training with --export-hf), and a run's own directory is not a target
    for bad in (dict(pooling="mean", n_classes=2), dict(rel_buckets=64), dict(activation="mish")):
        with pytest.raises(ValueError):
            mpnext.check_hf_exportable(dataclasses.replace(model.cfg, **bad))
    assert lab.main(["export", "--init", str(out), str(out)]) == 2
    assert train.main(["--data", str(tmp_path / "corpus"), "--out-dir", str(tmp_path / "m"), *TINY_ARGS,
                       "--activation", "mish", "--export-hf", str(tmp_path / "x")]) == 2


def test_finetune_takes_an_hf_mpnet_checkpoint(tmp_path):
    hf_dir = make_hf_mpnet(tmp_path / "hf-mpnet")
    fc, cfg, ft_model, ft_tok, _ = finetune_setup(["--init", hf_dir, "--data", toy_task(tmp_path / "t.csv"),
                                                   "--out-dir", str(tmp_path / "ft"), "--max-len", "32"])
    assert cfg.n_classes == 2 and isinstance(ft_tok, data.HFTokenizer)
    assert (tmp_path / "ft" / "hf_tokenizer").is_dir()


def test_bench_reports_side_by_side(tmp_path, capsys):
    argv = ["bench", "--data", toy_corpus(tmp_path / "corpus"), *TINY_ARGS, "--out-dir", str(tmp_path / "b"),
            "--steps", "2"]
    assert lab.main(argv) == 0
    assert (tmp_path / "b" / "tokenizer.json").exists() and not (tmp_path / "b" / "ckpt.pt").exists()
    out = capsys.readouterr().out
    assert "tokenizer |" in out and "MB/s" in out
    assert "float32: matmul peak measured beside each step" in out
    for recipe in ("mlm", "plm", "mpnet", "mlm+rtd", "mpnet+rtd", "mpnet+span+sbo"):
        row = next(line for line in out.splitlines() if line.strip().startswith(f"MPNext {recipe} "))
        assert "ms/step" in row and "of peak" in row and "build" in row and "GFLOP" in row
    try:
        import transformers  # noqa: F401
        assert "x HF's MLM speed" in out
    except ImportError:
        assert "no HF reference row" in out
    assert "x MLM's time" in next(line for line in out.splitlines() if "MPNext mpnet " in line)
    forward = [line for line in out.splitlines() if "MPNext encode" in line]  # inference: in order and grouped
    assert "encoder forward |" in out and len(forward) == 2 * (1 + train.native_bf16("cpu"))
    assert all("tok/s" in line and "padding" in line and "of peak" in line for line in forward)
    assert lab.main([*argv, "--rows", "mpnet", "--dtype", "float32"]) == 0  # one row, one precision
    rows = [line for line in capsys.readouterr().out.splitlines() if "ms/step" in line]
    assert len(rows) == 1 and "MPNext mpnet " in rows[0]


def test_lab_commands_refuse_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for argv in (["finetune"], ["compare", "--cells", "objective=mlm"], ["bench"]):
        assert lab.main([*argv, "--out-dir", str(tmp_path / "x")]) == 2
        assert "not torchrun" in capsys.readouterr().err


def test_lab_help_lists_every_command_and_a_wrong_one_is_one_line(capsys):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "lab", "--help"], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and all(f"  {command} " in r.stdout for command in lab.COMMANDS), r.stdout
    for argv in ([], ["fine-tune"]):
        assert lab.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "finetune" in err


def test_lab_values_out_of_range_and_clashing_outputs_are_one_line_before_any_work(tmp_path, capsys):
    """Every command checks its numbers and its output directory first (in-process: each case fails in milliseconds,
    before any data is read)."""
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")  # another run
    (tmp_path / "file").write_text("x")
    cases = [(["finetune", "--folds", "2"], "--folds"), (["finetune", "--dropout", "1.5"], "--dropout 1.5"),
             (["finetune", "--out-dir", str(tmp_path / "file")], "is a file"),
             (["fill", "--init", "x", "--top-k", "0", "a <mask>"], "--top-k"),
             (["export", "--init", str(tmp_path / "x"), str(tmp_path / "run")], "holding an MPNext run"),
             (["compare", "--cells", "objective=mlm | lr=5"], "cell 'lr=5': --lr"),
             (["compare", "--cells", "rtd=ture"], "true or false"), (["compare", "--cells", "lr=1e-3 | lr=1e-3"], "twice"),
             (["compare", "--finetune=--epochs 0"], "--epochs 0"), (["compare", "--finetune=--init x"], "sets"),
             (["compare", "--seed", "3"], "sets ['seed']"), (["compare", "--tasks", "a,"], "empty task name"),
             (["compare", "--out-dir", str(tmp_path / "file")], "is a file")]
    for args, needle in cases:
        assert lab.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, (args, err)


def test_finetune_judges_its_input_first_and_says_where_its_output_went(tmp_path, monkeypatch, capsys):
    task = toy_task(tmp_path / "t.csv", n=120)
    ft = ["--data", task, "--out-dir", str(tmp_path / "ft"), *FT_ARGS, "--epochs", "1"]
    monkeypatch.setattr(train, "PLAIN_EVERY", 0)
    res, status = finetune(ft)
    out = capsys.readouterr().out
    assert status == 0 and f"| in {tmp_path / 'ft'}" in out and "step 1/" in out  # where it went; alive in a log
    assert lab.main(["finetune", "--init", "outt", *ft[:4]]) == 2  # the mistyped input, not the taken output
    err = capsys.readouterr().err
    assert "--init outt: no such run or checkpoint directory" in err and err.count("\n") == 1
    assert lab.main(["finetune", *ft]) == 2
    assert "to fine-tune again, pass another --out-dir" in capsys.readouterr().err


def test_compare_with_one_seed_shows_no_spread_and_says_what_it_pretrains(tmp_path, capsys):
    corpus = toy_corpus(tmp_path / "corpus")
    task = toy_task(tmp_path / "t.csv", n=120)
    argv = ["--cells", "objective=mlm", "--seeds", "1", "--no-random", "--tasks", task, "--finetune",
            "--max-len 32 --folds 0", "--out-dir", str(tmp_path / "cmp"), "--data", corpus, *TINY_ARGS,
            "--samples", "0", "--max-steps", "2", "--eval-every", "2"]
    rows, status = compare(argv)
    assert status == 0 and "=== objective=mlm | seed 0 | pre-training" in capsys.readouterr().out
    assert "+-" not in (tmp_path / "cmp" / "results.md").read_text().split("\n", 1)[1]  # one seed: no spread
    with pytest.raises(SystemExit):
        compare_args(["--help"])
    assert "(default: 3)" in capsys.readouterr().out


def test_ctrl_c_in_a_lab_command_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tasks, "load_task", interrupted)  # Ctrl-C while the task is read
    assert lab.main(["finetune", "--out-dir", str(tmp_path / "ft")]) == 130
    err = capsys.readouterr().err
    assert err.strip().startswith("stopped (Ctrl-C)") and len(err.strip().splitlines()) == 1


def test_hf_tokenizer_says_nothing_of_long_texts(tmp_path, capfd):
    pytest.importorskip("transformers")
    tok = data.HFTokenizer(make_hf_mpnet(tmp_path / "hf"))
    capfd.readouterr()
    assert len(tok.encode("the cat sees the dog . " * 200)) > 512  # longer than the model: we truncate ourselves
    assert "Token indices sequence length" not in capfd.readouterr().err
