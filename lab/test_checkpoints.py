"""Real checkpoints: sentence-transformers in and out (on a tiny generated sentence-transformers directory), the lab's
fast inference, and a real checkpoint where MPNEXT_REAL_CHECKPOINT names one, e.g. a local all-mpnet-base-v2:

    MPNEXT_REAL_CHECKPOINT=/path/to/all-mpnet-base-v2 python -m pytest -q lab/test_checkpoints.py
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import data
import lab
import mpnext
import train
from lab import infer, tasks
from lab.use import load_run
from test_mpnext import make_hf_mpnet, toy_corpus

torch.set_num_threads(2)

SENTENCES = ["The old sailor sees the river.", "A dog.", "The quiet farmer builds a small house by the dark river "
             "and the young child watches the bright red ship.", "Queen."]


def mean_pooled(model, tok, texts):
    rows = tasks.encode_examples([(t,) for t in texts], tok, model.cfg.max_len)
    return infer.mean_features(model, rows, "cpu", train.autocast_for("cpu", torch.float32))


def make_st_dir(path, normalize=True):
    """A tiny sentence-transformers directory around a random HF MPNet, in the layout all-mpnet-base-v2 has: the
    model at the top, mean pooling in 1_Pooling/, then (normalize) unit length."""
    st, transformers = pytest.importorskip("sentence_transformers"), pytest.importorskip("transformers")
    transformers.MPNetModel.from_pretrained(make_hf_mpnet(path)).save_pretrained(path)  # a sentence encoder: no LM head
    modules = [("0", "", "Transformer"), ("1", "1_Pooling", "Pooling"), ("2", "2_Normalize", "Normalize")]
    modules = modules[:3 if normalize else 2]
    (path / "modules.json").write_text(json.dumps([dict(idx=i, name=n, path=p, type="sentence_transformers.models." + t)
                                                   for i, (n, p, t) in enumerate(modules)]))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 60, "do_lower_case": False}))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    return str(path), st


def test_sentence_transformers_in_and_out(tmp_path):
    st_dir, st = make_st_dir(tmp_path / "st")
    cfg, state, tok = data.read_init(st_dir)  # in: the same embeddings as sentence-transformers computes
    model = mpnext.MPNext(cfg)
    assert not [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.startswith("head_")]
    original = st.SentenceTransformer(st_dir, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(F.normalize(mean_pooled(model.eval(), tok, SENTENCES), dim=-1), original,
                               atol=1e-5, rtol=1e-4)
    assert set(tok.st_files) == {"modules.json", "sentence_bert_config.json", "1_Pooling/config.json"}
    run, out, out2 = (str(tmp_path / n) for n in ("run", "export", "export2"))  # continue pre-training, then out
    argv = ["--init", st_dir, "--data", toy_corpus(tmp_path / "corpus"), "--out-dir", run, "--max-steps", "3",
            "--eval-every", "3", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--samples", "0",
            "--warmup-steps", "1", "--lr", "1e-3", "--export-hf", out]
    assert train.main(argv) == 0 and lab.main(["export", "--init", run, out2]) == 0
    adapted, tok2 = load_run(run)
    ours = F.normalize(mean_pooled(adapted, tok2, SENTENCES), dim=-1)
    assert not torch.allclose(ours, original, atol=1e-3)  # the run trained
    for d in (out, out2):
        for name, text in tok.st_files.items():  # the layout as it came in: pooling, normalisation, max length
            assert open(os.path.join(d, name)).read() == text
        loaded = st.SentenceTransformer(d, device="cpu")
        assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
        assert "mean" in str(loaded[1].get_config_dict()) and loaded.max_seq_length == 60
        torch.testing.assert_close(loaded.encode(SENTENCES, convert_to_tensor=True), ours, atol=1e-5, rtol=1e-4)
    plain = make_hf_mpnet(tmp_path / "plain")  # a plain checkpoint exports no sentence-transformers files
    assert data.HFTokenizer(plain).st_files == {}


def test_a_sentence_encoder_gets_a_fresh_seeded_lm_head(tmp_path):
    st_dir, _ = make_st_dir(tmp_path / "st", normalize=False)  # (its weights lack the LM head, as all-mpnet-base-v2's)
    _, state, _ = data.read_init(st_dir)
    assert not [k for k in state if k.startswith("head_")]  # HF's unseeded random head is not passed on
    _, state, _ = data.read_init(make_hf_mpnet(tmp_path / "mlm"))
    assert "head_dense.weight" in state  # an MPNetForMaskedLM keeps its head


def test_length_batches_and_grouped_epochs():
    lengths = [5, 30, 7, 30, 12, 3, 29, 8]
    batches = infer.length_batches(lengths, max_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len(b) * max(lengths[i] for i in b) <= 64 for b in batches if len(b) > 1)
    assert [lengths[i] for i in batches[0]] == [30, 30]  # longest first: the largest batch fails first
    g = torch.Generator().manual_seed(0)
    epoch = infer.grouped_epoch(list(range(100)), 10, g, window=5)  # lengths 0..99, windows of 50 examples
    assert sorted(i for b in epoch for i in b) == list(range(100)) and all(len(b) == 10 for b in epoch)
    assert all(max(b) - min(b) < 50 for b in epoch)  # a batch stays within its window ...
    perm = torch.randperm(100, generator=g).tolist()
    plain = [perm[i:i + 10] for i in range(0, 100, 10)]
    assert sum(max(b) - min(b) for b in epoch) < sum(max(b) - min(b) for b in plain) / 3  # ... of alike lengths
    assert epoch != infer.grouped_epoch(list(range(100)), 10, g, window=5)  # shuffled anew each epoch


def test_features_match_the_plain_forward_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MPNEXT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = mpnext.MPNext(mpnext.MPNextConfig.from_preset("tiny", vocab_size=64, n_layer=2)).eval()
    g = torch.Generator().manual_seed(0)
    rows = [[0] + torch.randint(5, 64, (n,), generator=g).tolist() + [2] for n in (3, 40, 7, 19, 1, 40)]
    plain = torch.stack([mpnext.pool(model.encode(torch.tensor([r])), torch.ones(1, len(r)), "mean")[0]
                         for r in rows])  # one at a time, no padding at all
    feats, seconds = infer.cached_features(model, {"train": rows}, "cpu", torch.float32)
    torch.testing.assert_close(feats["train"], plain, atol=1e-5, rtol=1e-5)
    assert seconds is not None and len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 1
    again, seconds = infer.cached_features(model, {"train": rows}, "cpu", torch.float32)
    assert seconds is None and torch.equal(again["train"], feats["train"])  # read back
    with torch.no_grad():
        model.blocks[0].fc1.weight[0, 0] += 1.0  # other weights: computed anew
    _, seconds = infer.cached_features(model, {"train": rows}, "cpu", torch.float32)
    assert seconds is not None and len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2
    if train.native_bf16("cpu"):  # bf16 autocast: close to float32, not equal
        bf16, _ = infer.cached_features(model, {"train": rows}, "cpu", torch.bfloat16, cache=False)
        assert (bf16["train"] - feats["train"]).abs().max() < 0.1


REAL = os.environ.get("MPNEXT_REAL_CHECKPOINT")


@pytest.mark.skipif(not REAL, reason="set MPNEXT_REAL_CHECKPOINT to a local MPNet checkpoint directory")
def test_a_real_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, state, tok = data.read_init(REAL)
    model = mpnext.MPNext(cfg)
    model.load_state_dict(state, strict=False)
    model.eval()
    hf = transformers.MPNetModel.from_pretrained(REAL).eval()
    sentences = ["The film is a charming, unpretentious delight.", "Dull.", "An uneven but often surprisingly moving "
                 "portrait of two brothers who cannot forgive each other, told with restraint and wit."]
    enc = tok.hf(sentences, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padded rows
    with torch.no_grad():
        ours, theirs = model.encode(enc["input_ids"], enc["attention_mask"]), hf(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)
    # --init, a few MPNet steps with whole-word masking from WordPiece "##", export, reload
    ids = tok.encode("unpretentious")
    assert tok.word_start[ids].tolist() == [True] + [False] * (len(ids) - 1) and len(ids) > 1
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "reviews.txt").write_text("\n".join(sentences * 40))
    run, out = str(tmp_path / "run"), str(tmp_path / "export")
    assert train.main(["--init", REAL, "--data", str(corpus), "--out-dir", run, "--objective", "mpnet", "--masking",
                       "word", "--max-steps", "3", "--eval-every", "3", "--batch-size", "4", "--seq-len", "64",
                       "--eval-batches", "1", "--samples", "0", "--warmup-steps", "1", "--lr", "1e-4",
                       "--export-hf", out]) == 0
    adapted, _ = load_run(run)
    with torch.no_grad():
        after = adapted.encode(enc["input_ids"], enc["attention_mask"])
        reloaded = transformers.MPNetModel.from_pretrained(out).eval()(**enc).last_hidden_state
    assert torch.isfinite(after).all() and not torch.allclose(after[keep], ours[keep], atol=1e-3)
    torch.testing.assert_close(reloaded[keep], after[keep], atol=1e-4, rtol=1e-4)
    if os.path.exists(os.path.join(REAL, "modules.json")):  # a sentence encoder goes out as one
        st = pytest.importorskip("sentence_transformers")
        emb = st.SentenceTransformer(out, device="cpu").encode(sentences, convert_to_tensor=True)
        torch.testing.assert_close(emb, F.normalize(mean_pooled(adapted, tok, sentences), dim=-1) if "Normalize" in
                                   open(os.path.join(REAL, "modules.json")).read() else
                                   mean_pooled(adapted, tok, sentences), atol=1e-4, rtol=1e-4)
