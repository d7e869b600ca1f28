"""MPNext test suite: run with `python -m pytest -q test_mpnext.py`.

Every claim is checked against a reference: torch.nn.functional, torch.optim, Hugging Face transformers' MPNet (tests
skip cleanly when it is not installed), closed forms, and information-flow tests for every attention mask.
"""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import mpnext
from mpnext import MPNext, MPNextConfig, make_batch, relative_bucket, two_stream_mask

torch.set_num_threads(2)


def tiny_cfg(**kw):
    base = dict(vocab_size=120, n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=64, dropout=0.0, attn_dropout=0.0,
                pad_id=1, mask_id=119, special_ids=(0, 1, 2, 3, 119))
    return MPNextConfig(**{**base, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MPNext(tiny_cfg(**kw)).eval()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_ids(B, N, seed=0, cfg=None):
    cfg = cfg or tiny_cfg()
    return torch.randint(4, cfg.vocab_size - 1, (B, N), generator=gen(seed))


# ---------------------------------------------------------------------------------------------------------------------
# activations and relative positions


def test_mish_equals_torch():
    x = torch.linspace(-120, 120, 20001, dtype=torch.float64, requires_grad=True)
    ours, ref = mpnext.mish(x), F.mish(x)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    g1, = torch.autograd.grad(ours.sum(), x)
    g2, = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(g1, g2, atol=1e-10) and torch.isfinite(g1).all()
    x32 = torch.randn(1000) * 10
    assert (mpnext.mish(x32) - F.mish(x32)).abs().max() < 1e-6


def test_relative_bucket_closed_form():
    b = relative_bucket(torch.tensor([0]), torch.tensor([0, 3, -3, -20, -500, 20, 500]))[0].tolist()
    # n = 0 -> 0; n = -3 (key right) -> 16 + 3; n = 3 -> 3; n = 20 -> 8 + floor(log(20/8)/log(16)*8) = 10; far -> 15
    assert b == [0, 16 + 3, 3, 10, 15, 16 + 10, 31]


def test_relative_bucket_matches_hf():
    pytest.importorskip("transformers")
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    pos = torch.arange(600)
    rel = pos[None, :] - pos[:, None]  # key - query, HF's convention
    assert torch.equal(relative_bucket(pos, pos), MPNetEncoder.relative_position_bucket(rel))


# ---------------------------------------------------------------------------------------------------------------------
# masks: structure


@pytest.mark.parametrize("n,p", [(7, 3), (10, 1), (12, 5), (5, 5)])
def test_mpnet_mask_every_row_sees_n_positions(n, p):
    allowed = two_stream_mask(n, p, "mpnet")
    assert allowed.shape == (n + 2 * p, n + p)
    assert (allowed.sum(1) == n).all()
    c = n - p
    # non-predicted and mask-copy content rows never see predicted content (the 2-hop leak)
    assert not allowed[:c, c:n].any() and not allowed[n:n + p, c:n].any()
    for k in range(p):
        q = allowed[n + p + k]
        assert q[c:c + k].all() and not q[c + k:n].any()  # p_<k seen, p_>=k not (own content blocked)
        assert q[n + k:].all() and not q[n:n + k].any()  # mask copies m_>=k (own included)
        # every original position appears exactly once among what query k sees
        seen_pos = torch.cat([torch.arange(c), torch.arange(c, n)[q[c:n]], torch.arange(c, n)[q[n:]]])
        assert sorted(seen_pos.tolist()) == list(range(n))


@pytest.mark.parametrize("n,p", [(7, 3), (10, 4)])
def test_plm_mask_sees_c_plus_k_minus_1(n, p):
    allowed = two_stream_mask(n, p, "plm")
    c = n - p
    assert allowed.shape == (n + p, n)
    for k in range(1, p + 1):  # k-th prediction (1-based) sees C + k - 1 keys
        assert allowed[n + k - 1].sum() == c + k - 1
        assert allowed[c + k - 1].sum() == c + k  # content p_k sees itself too
    assert (allowed[:c].sum(1) == c).all()


def test_render_masks_shows_the_paper_example():
    text = mpnext.render_masks(7, 3)
    lines = text.splitlines()
    assert len(lines) == 1 + 13
    # the docstring example of fairseq's make_query_and_content_mask: the query row for x6 allows x5, m6, m7
    assert lines[-2].split() == ["q6", "#", "#", "#", "#", "#", ".", ".", ".", "#", "#"]


# ---------------------------------------------------------------------------------------------------------------------
# information flow through the full stack


def two_stream_inputs(cfg, B=2, N=12, seed=0, objective="mpnet"):
    return make_batch(random_ids(B, N, seed, cfg), cfg, gen(seed), objective=objective)


@pytest.mark.parametrize("kind", ["mpnet", "plm"])
def test_changing_predicted_token_k_only_reaches_later_queries(kind):
    cfg = tiny_cfg(n_layer=3)
    model = tiny_model(n_layer=3)
    batch = two_stream_inputs(cfg, objective=kind)
    ids, pos, P = batch["input_ids"], batch["positions"], batch["targets"].shape[1]
    N = ids.shape[1] - (2 * P if kind == "mpnet" else P)
    C = N - P
    with torch.no_grad():
        h0 = model.two_stream_encode(ids, pos, P, kind)
        for k in range(P):  # change the CONTENT of the k-th predicted token
            ids2 = ids.clone()
            ids2[:, C + k] = (ids2[:, C + k] - 4 + 1) % (cfg.vocab_size - 5) + 4
            h1 = model.two_stream_encode(ids2, pos, P, kind)
            q0, q1 = h0[:, -P:], h1[:, -P:]
            assert torch.equal(q0[:, :k + 1], q1[:, :k + 1]), "query k (or earlier) saw predicted content p_k"
            if k + 1 < P:
                assert (q0[:, k + 1:] - q1[:, k + 1:]).abs().amax() > 1e-4, "later queries must see p_k"
            assert torch.equal(h0[:, :C], h1[:, :C]), "non-predicted rows saw predicted content"
            if kind == "mpnet":
                assert torch.equal(h0[:, N:N + P], h1[:, N:N + P]), "mask-copy rows saw predicted content"


def test_query_gradient_never_reaches_own_content():
    """Gradient version of the leak test: d(query k output)/d(embedding of row p_k) == 0 for every k."""
    cfg = tiny_cfg()
    model = tiny_model()
    batch = two_stream_inputs(cfg, B=1, N=16)
    ids, pos, P = batch["input_ids"], batch["positions"], batch["targets"].shape[1]
    N = ids.shape[1] - 2 * P
    x = model.embed(ids, pos).detach().requires_grad_(True)
    allowed = two_stream_mask(N, P)[None, None]
    bias = model.attention_bias(pos, pos[:, :N + P], allowed, torch.float32)
    out = model.run_blocks(x, bias, N + P)
    w = torch.randn(cfg.d_model, generator=gen(1))  # a random readout (a plain sum of a LayerNorm output is constant)
    for k in range(P):
        g, = torch.autograd.grad(out[0, N + P + k] @ w, x, retain_graph=True)
        assert g[0, N - P + k:N].abs().max() == 0  # predicted content p_>=k: no influence
        assert (g[0, N - P:N - P + k].abs().sum(-1) > 0).all()  # p_<k: influence
        assert (g[0, N + k:N + P].abs().sum(-1) > 0).all()  # mask copies m_>=k: influence


def test_padding_never_leaks():
    """Changing what padding rows contain (their token and position embedding rows) leaves the hidden state of every
    real token unchanged, in the natural-order path and in both two-stream layouts."""
    cfg = tiny_cfg()
    model = tiny_model()
    ids = random_ids(3, 14, cfg=cfg)
    ids[0, 10:] = cfg.pad_id
    ids[2, 6:] = cfg.pad_id
    batches = {o: make_batch(ids, cfg, gen(1), objective=o) for o in ("mpnet", "plm", "mlm")}

    def hidden():
        out = {}
        for o, b in batches.items():
            if o == "mlm":
                out[o] = model.encode(b["input_ids"], b["attention_mask"])
            else:
                out[o] = model.two_stream_encode(b["input_ids"], b["positions"], b["targets"].shape[1], o)
        return out

    with torch.no_grad():
        before = hidden()
        model.tok_emb.weight[cfg.pad_id].normal_()
        model.pos_emb.weight[1].normal_()
        after = hidden()
    for o, b in batches.items():
        real = b["input_ids"] != cfg.pad_id
        assert torch.allclose(before[o][real], after[o][real], atol=1e-6), o
        assert not torch.allclose(before[o][~real], after[o][~real])  # the pad rows themselves did change


# ---------------------------------------------------------------------------------------------------------------------
# the one-call two-stream attention equals the paper's two separate attention calls


def reference_two_stream(model, ids, pos, P):
    """Straightforward MPNet forward (fairseq's two_stream_self_attention): two attention calls per layer that share
    K and V from the content stream, the content mask and query mask separately, query bias = mask-copy rows."""
    cfg = model.cfg
    T = ids.shape[1]
    N = T - 2 * P
    D, H = cfg.d_model, cfg.n_head
    hs = D // H
    x = model.embed(ids, pos)
    c, q = x[:, :N + P], x[:, N + P:]
    allowed = two_stream_mask(N, P)
    content_mask, query_mask = allowed[:N + P], allowed[N + P:]
    cpos = pos[:, :N + P]
    bias_c = model.rel_bias(relative_bucket(cpos, cpos)).permute(0, 3, 1, 2)  # (B, H, N+P, N+P)
    bias_q = bias_c[:, :, -P:]  # rows of the mask copies share the query positions

    def attend(xq, k, v, bias, mask, blk):
        wq, bq = blk.attn.qkv.weight[:D], blk.attn.qkv.bias[:D]
        qh = F.linear(xq, wq, bq).view(xq.shape[0], -1, H, hs).transpose(1, 2)
        s = qh @ k.transpose(-1, -2) / math.sqrt(hs) + bias
        s = s.masked_fill(~mask, float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(xq.shape[0], -1, D)
        return blk.attn.proj(y)

    for blk in model.blocks:
        wk, bk = blk.attn.qkv.weight[D:2 * D], blk.attn.qkv.bias[D:2 * D]
        wv, bv = blk.attn.qkv.weight[2 * D:], blk.attn.qkv.bias[2 * D:]
        k = F.linear(c, wk, bk).view(c.shape[0], -1, H, hs).transpose(1, 2)
        v = F.linear(c, wv, bv).view(c.shape[0], -1, H, hs).transpose(1, 2)
        c_attn = attend(c, k, v, bias_c, content_mask, blk)
        q_attn = attend(q, k, v, bias_q, query_mask, blk)
        c, q = blk.ln1(c + c_attn), blk.ln1(q + q_attn)
        c, q = blk.ln2(c + blk.fc2(blk.act(blk.fc1(c)))), blk.ln2(q + blk.fc2(blk.act(blk.fc1(q))))
    return model.lm_head(q)


@pytest.mark.parametrize("N,seed", [(10, 0), (20, 1), (33, 2)])
def test_one_call_two_stream_equals_two_call_reference(N, seed):
    cfg = tiny_cfg()
    model = tiny_model(seed)
    batch = two_stream_inputs(cfg, B=3, N=N, seed=seed)
    P = batch["targets"].shape[1]
    with torch.no_grad():
        ours = model.two_stream(batch["input_ids"], batch["positions"], P)
        ref = reference_two_stream(model, batch["input_ids"], batch["positions"], P)
    assert ours.shape == (3, P, cfg.vocab_size)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face parity


def hf_pair(seed, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hc = transformers.MPNetConfig(vocab_size=kw.get("vocab", 150), hidden_size=kw.get("d", 48), num_hidden_layers=2,
                                  num_attention_heads=kw.get("h", 4), intermediate_size=96, max_position_embeddings=66,
                                  layer_norm_eps=1e-5, pad_token_id=1)
    hf = transformers.MPNetForMaskedLM(hc).eval()
    with torch.no_grad():  # HF zero-initialises some tensors (biases, LM bias): randomise all for a strict test
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return transformers, hf


@pytest.mark.parametrize("seed,B,T,d,h", [(0, 2, 9, 48, 4), (1, 3, 37, 32, 2), (2, 1, 64, 48, 3)])
def test_logits_match_hf_mpnet(seed, B, T, d, h, tmp_path):
    transformers, hf = hf_pair(seed, d=d, h=h)
    ids = torch.randint(4, 149, (B, T), generator=gen(seed))
    if B > 1:
        ids[1, T // 2:] = 1  # right padding
    am = (ids != 1).long()
    ours = MPNext.from_hf(hf).eval()
    with torch.no_grad():
        ref = hf(ids, attention_mask=am).logits
        assert torch.allclose(ours(ids, am), ref, atol=1e-5, rtol=0)
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)  # no mask: pads attended, like HF
    # and back: MPNext -> HF checkpoint -> transformers
    ours.to_hf(tmp_path)
    hf2 = transformers.MPNetForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(hf2(ids, attention_mask=am).logits, ours(ids, am), atol=1e-5, rtol=0)


def test_fresh_mpnext_exports_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(3, vocab_size=130, mask_id=129, special_ids=(0, 1, 2, 3, 129))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to_hf(tmp_path)
    hf = transformers.MPNetForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, 129, (2, 21), generator=gen(5))
    ids[0, 17:] = 1
    am = (ids != 1).long()
    with torch.no_grad():
        assert torch.allclose(hf(ids, attention_mask=am).logits, model(ids, am), atol=1e-5, rtol=0)
    back = MPNext.from_hf(hf, mask_id=129)
    assert back.cfg.special_ids == (0, 1, 2, 3, 129)
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_from_hf_mpnet_model_without_head():
    transformers, hf = hf_pair(4)
    encoder = hf.mpnet  # an MPNetModel: same encoder, no LM head
    ours = MPNext.from_hf(encoder).eval()
    ids = torch.randint(4, 149, (2, 11), generator=gen(4))
    with torch.no_grad():
        assert torch.allclose(ours.encode(ids), encoder(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_too_long_input_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds max_len=64"):
        model(random_ids(1, 65))


def test_to_hf_refuses_what_hf_cannot_represent(tmp_path):
    with pytest.raises(ValueError, match="pre_ln"):
        tiny_model(pre_ln=True).to_hf(tmp_path)


def test_base_preset_is_mpnet_base():
    cfg = MPNextConfig.from_preset("base")
    model = MPNext(cfg)
    assert model.pos_emb.num_embeddings == 514 and cfg.layer_norm_eps == 1e-5 and cfg.vocab_size == 30527
    assert 109e6 < model.num_params() < 111e6  # MPNet-base: ~110M
    with pytest.raises(ValueError, match="unknown preset"):
        MPNextConfig.from_preset("huge")


# ---------------------------------------------------------------------------------------------------------------------
# input builders


def test_builders_are_deterministic_under_a_seed():
    cfg = tiny_cfg(whole_word=True)
    ids = random_ids(4, 30, cfg=cfg)
    ws = torch.rand(4, 30, generator=gen(9)) < 0.6
    for o in ("mpnet", "plm", "mlm"):
        a = make_batch(ids, cfg, gen(3), ws, objective=o)
        b = make_batch(ids, cfg, gen(3), ws, objective=o)
        c = make_batch(ids, cfg, gen(4), ws, objective=o)
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
        assert not torch.equal(a["input_ids"], c["input_ids"])
    # the same seed picks the same predicted tokens whatever the objective
    m, l = make_batch(ids, cfg, gen(3), ws, "mpnet"), make_batch(ids, cfg, gen(3), ws, "mlm")
    assert torch.equal(m["positions"][:, -m["targets"].shape[1]:], l["pred_positions"])


def test_mpnet_batch_layout():
    cfg = tiny_cfg()
    ids = random_ids(3, 40, cfg=cfg)
    b = make_batch(ids, cfg, gen(0))
    P = b["targets"].shape[1]
    N = 40
    assert P == round(0.15 * N)
    x, pos = b["input_ids"], b["positions"]
    assert x.shape == pos.shape == (3, N + 2 * P)
    assert all(sorted(r) == list(range(N)) for r in pos[:, :N].tolist())  # a permutation of the positions
    assert torch.equal(x[:, :N], ids.gather(1, pos[:, :N]))  # content stream: uncorrupted, permuted
    assert torch.equal(x[:, N:N + P], x[:, N + P:])  # one corruption shared by both copies
    assert torch.equal(pos[:, N - P:N], pos[:, N:N + P]) and torch.equal(pos[:, N:N + P], pos[:, N + P:])
    assert torch.equal(b["targets"], ids.gather(1, pos[:, N - P:N]))


def test_special_tokens_and_padding_never_predicted_nor_sampled():
    cfg = tiny_cfg(pred_ratio=0.5, mask_prob=0.0, random_prob=1.0)  # every predicted token replaced at random
    ids = random_ids(64, 24, cfg=cfg)
    ids[:, 0] = 0  # <s>
    ids[:, 11] = 2  # </s> separator
    ids[:16, 18:] = cfg.pad_id
    b = make_batch(ids, cfg, gen(0), objective="mlm")
    special = torch.tensor(cfg.special_ids)
    assert not torch.isin(b["targets"], special).any()
    P = b["targets"].shape[1]
    assert P == 12  # round(0.5 * 24); the padded rows still have 24 - 6 - 2 = 16 predictable tokens
    replaced = b["input_ids"].gather(1, b["pred_positions"])
    assert not torch.isin(replaced, special).any()
    assert (b["attention_mask"][:16, 18:] == 0).all()


def test_corruption_is_80_10_10():
    cfg = tiny_cfg(pred_ratio=0.5)
    ids = random_ids(400, 50, cfg=cfg)
    b = make_batch(ids, cfg, gen(0), objective="mlm")
    fed = b["input_ids"].gather(1, b["pred_positions"])
    t = b["targets"]
    masked = (fed == cfg.mask_id).float().mean()
    kept = (fed == t).float().mean()
    assert abs(masked - 0.8) < 0.01 and abs(kept - (0.1 + 0.1 / 114)) < 0.01


def test_plm_batch_feeds_plain_masks():
    cfg = tiny_cfg()
    b = make_batch(random_ids(2, 20, cfg=cfg), cfg, gen(0), objective="plm")
    P = b["targets"].shape[1]
    assert (b["input_ids"][:, -P:] == cfg.mask_id).all() and b["input_ids"].shape[1] == 20 + P


def test_whole_word_permutation_keeps_words_together():
    cfg = tiny_cfg(whole_word=True, pred_ratio=0.3)
    B, N = 50, 40
    ids = random_ids(B, N, cfg=cfg)
    ws = torch.rand(B, N, generator=gen(1)) < 0.4
    ws[:, 0] = True
    b = make_batch(ids, cfg, gen(2), ws, objective="mlm")
    word = ws.long().cumsum(1) - 1
    for r in range(B):
        pred = set(b["pred_positions"][r].tolist())
        cut = 0
        for w in word[r].unique():
            members = set((word[r] == w).nonzero()[:, 0].tolist())
            inside = len(members & pred)
            cut += 0 < inside < len(members)
        assert cut <= 1  # whole words, except possibly one cut at the boundary of the predicted block


def test_loss_and_return_mlm():
    cfg = tiny_cfg(return_mlm=True)
    model = tiny_model(return_mlm=True)
    b = make_batch(random_ids(2, 20, cfg=cfg), cfg, gen(0))
    loss, metrics = model.loss(b)
    assert "mlm_loss" in metrics and torch.allclose(loss, metrics["loss"] + metrics["mlm_loss"])
    assert abs(metrics["loss"].item() - math.log(cfg.vocab_size)) < 0.5  # untrained: about log V


@pytest.mark.parametrize("objective", ["mpnet", "plm", "mlm"])
def test_tiny_model_overfits_one_batch(objective):
    cfg = tiny_cfg(objective=objective)
    model = tiny_model(objective=objective).train()
    ids = random_ids(4, 24, cfg=cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(80):
        loss, _ = model.loss(make_batch(ids, cfg, gen(step)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_lr_multiplier():
    assert mpnext.lr_multiplier(0, 10, 100) == pytest.approx(0.1)
    assert mpnext.lr_multiplier(9, 10, 100) == pytest.approx(1.0)
    assert mpnext.lr_multiplier(55, 10, 100) == pytest.approx(0.5)
    assert mpnext.lr_multiplier(100, 10, 100) == pytest.approx(0.0)
    assert mpnext.lr_multiplier(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert mpnext.lr_multiplier(100, 10, 100, "cosine", min_ratio=0.1) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------------------
# data.py: corpora, tokenizer, batches

SAMPLE = ("The quick brown fox jumps over the lazy dog. It's 2024, and the dog doesn't care!\n"
          "Whole-word masking needs word boundaries;\ntabs\tand  double  spaces too.\n") * 20


@pytest.fixture(scope="module")
def tok():
    return data.Tokenizer.train(SAMPLE, vocab_size=data.Tokenizer().vocab_size + 60)


def test_bpe_wikipedia_example():
    # https://en.wikipedia.org/wiki/Byte_pair_encoding: aa -> Z, ab -> Y, ZY -> X, so "aaabdaaabac" -> "XdXac"
    n0 = len(data.SPECIAL_TOKENS) + 256
    t = data.Tokenizer.train("aaabdaaabac", vocab_size=n0 + 3)
    a, b, c, d = (len(data.SPECIAL_TOKENS) + ord(ch) for ch in "abcd")
    assert t.merges == [(a, a), (a, b), (n0, n0 + 1)]
    assert t.encode("aaabdaaabac") == [n0 + 2, d, n0 + 2, a, c]
    assert [t.id_to_piece(i) for i in t.encode("aaabdaaabac")] == ["aaab", "d", "aaab", "a", "c"]


@pytest.mark.parametrize("s", ["", "a", " ", "hello world", "  leading and trailing  ", "\n\n\n", "a\r\nb\r\n",
                               "\ttab\t\tx", "NUL\x00byte", "naïve café", "日本語",
                               "emoji 👍🏽 🤖!",
                               "x_y__z 12345 1.5e-3", "<mask> <s> </s> are plain text", "don't we'll I'VE"])
def test_roundtrip(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert all(i >= tok.n_special for i in ids)  # plain text never produces special ids


def test_specials_and_decode(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.n_special) == (0, 1, 2, 3, 5)
    hi = tok.encode("hi")
    assert tok.decode([tok.pad_id, tok.bos_id] + hi + [tok.mask_id, tok.eos_id, tok.pad_id]) == "<s>hi<mask></s>"
    assert tok.decode(torch.tensor(hi)) == "hi"
    assert tok.decode([tok.n_special + 0xE2]) == "\ufffd"  # a lone UTF-8 lead byte


def test_train_deterministic_and_save_load(tok, tmp_path):
    again = data.Tokenizer.train(SAMPLE.split("\n"), vocab_size=tok.vocab_size)  # docs vs one string: same counts
    assert again.merges == tok.merges and again.fingerprint == tok.fingerprint
    tok.save(tmp_path / "tok.json")
    loaded = data.Tokenizer.load(tmp_path / "tok.json")
    assert loaded.merges == tok.merges and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write left no temp file


def test_tokenizer_load_errors(tmp_path):
    for name, content in [("missing.json", None), ("bad.json", "{not json"), ("other.json", json.dumps({"a": 1}))]:
        p = tmp_path / name
        if content is not None:
            p.write_text(content)
        with pytest.raises(data.DataError, match=name):
            data.Tokenizer.load(p)
    with pytest.raises(data.DataError):
        data.Tokenizer.train("abc", vocab_size=100)


def test_word_start_table_and_flags():
    t = data.Tokenizer.train("the thing, the ring, singing the\n", vocab_size=data.Tokenizer().vocab_size + 10)
    piece = {t.id_to_piece(i): i for i in range(t.vocab_size)}
    assert t.word_start[[piece[" the"], piece[" thing"], piece[","], piece["\n"], t.mask_id]].all()
    assert not t.word_start[[piece["the"], piece["ing"], piece["a"], piece["7"]]].any()
    assert not t.word_start[t.n_special + 0xC3]  # UTF-8 lead byte: letters like "é" continue a word
    ids = np.array(t.encode("the thing\nthe thing") + [t.eos_id] + t.encode("singing"))
    pieces = [t.id_to_piece(i) for i in ids]
    assert pieces == ["the", " thing", "\n", "the", " thing", "</s>", "s", "inging"]
    flags = data.word_start_flags(ids, t)
    # "the" starts a line and "s" a document: forced True although the table says "continuation"
    assert flags.tolist() == [True, True, True, True, True, True, True, False]
    tflags = data.word_start_flags(torch.from_numpy(ids).view(1, -1), t)
    assert tflags.dtype == torch.bool and tflags[0].tolist() == flags.tolist()
    assert not t.word_start[piece["the"]] and flags.dtype == bool


def test_load_documents_file_and_dir(tmp_path):
    paras = [f"Paragraph {i}." + " word" * 100 for i in range(60)]  # ~60 x 520 chars
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    docs = data.load_documents(str(f))
    assert 10 <= len(docs) <= 20 and all(len(d) >= 2000 for d in docs[:-1])
    assert "\n\n".join(docs) == "\n\n".join(paras).strip()  # nothing lost but the outer whitespace
    train, val = data.split_documents(docs, val_fraction=0.1, seed=0)
    assert len(val) >= 1 and sorted(train + val) == sorted(docs)
    assert data.split_documents(docs, 0.1, seed=0) == (train, val)
    one_train, one_val = data.split_documents(["alpha beta gamma delta " * 50], 0.1)
    assert one_val and (one_train[0] + " " + one_val[0]).split() == ("alpha beta gamma delta " * 50).split()
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second", encoding="utf-8")
    (d / "sub" / "a.txt").write_text("third", encoding="utf-8")
    (d / "a.txt").write_text("first\n", encoding="utf-8")
    (d / "skip.md").write_text("not text", encoding="utf-8")
    assert data.load_documents(str(d)) == ["first", "second", "third"]


def test_load_documents_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n  ")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ok".encode("latin-1"))
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "x.csv").write_text("a,b")
    cases = {"missing.txt": "no such file", "empty.txt": "empty", "blank.txt": "empty",
             "latin1.txt": "offset 3.*UTF-8", "nodocs": "no .txt files"}
    for name, why in cases.items():
        with pytest.raises(data.DataError, match=why) as e:
            data.load_documents(str(tmp_path / name))
        assert name in str(e.value) and "\n" not in str(e.value)


def test_batches(tok):
    stream = data.encode_documents(SAMPLE.split("\n\n") * 3, tok)
    assert stream.dtype == np.uint16 and stream[-1] == tok.eos_id
    batches = data.Batches(stream, tok, seq_len=16, batch_size=4)
    x1, f1 = batches.sample(torch.Generator().manual_seed(0))
    x2, f2 = batches.sample(torch.Generator().manual_seed(0))
    assert x1.shape == f1.shape == (4, 16) and x1.dtype == torch.long and f1.dtype == torch.bool
    assert torch.equal(x1, x2) and torch.equal(f1, f2)
    assert (x1[:, 0] == tok.bos_id).all()
    assert torch.equal(f1, data.word_start_flags(x1, tok))  # same flags as computing them on the rows
    text = tok.decode(x1[0, 1:])
    assert text in tok.decode(stream)  # rows are consecutive stream tokens
    rows = [x for x, _ in batches.iterate()]
    assert len(rows) == len(batches)
    covered = torch.cat(rows)[:, 1:].reshape(-1)
    n = len(stream) // 15 * 15
    assert torch.equal(covered, torch.from_numpy(stream[:n].astype(np.int64)))
    with pytest.raises(data.DataError, match="shorter than one block"):
        data.Batches(stream[:10], tok, seq_len=16, batch_size=4, name="val")


def test_encode_documents_cache(tok, tmp_path, monkeypatch):
    docs = ["first document here.", "and a second one"]
    path = tmp_path / "stream.npy"
    s1 = data.encode_documents(docs, tok, cache_path=path)
    assert s1.tolist() == tok.encode(docs[0]) + [tok.eos_id] + tok.encode(docs[1]) + [tok.eos_id]
    monkeypatch.setattr(tok, "encode", lambda text: pytest.fail("cache not used"))
    assert np.array_equal(data.encode_documents(docs, tok, cache_path=path), s1)
    monkeypatch.undo()
    other = data.Tokenizer.train("first document", vocab_size=data.Tokenizer().vocab_size + 5)
    s2 = data.encode_documents(docs, other, cache_path=path)  # different tokenizer -> rebuilt
    assert s2.tolist() == other.encode(docs[0]) + [2] + other.encode(docs[1]) + [2]
    with pytest.raises(data.DataError):
        data.encode_documents(["", ""], tok)


def test_sentence_polarity(tmp_path):
    (tmp_path / "rt-polarity.pos").write_bytes(b"a gorgeous film \x96 truly .\nfun .\n")
    (tmp_path / "rt-polarity.neg").write_bytes("bad caf\xe9 \x97 .\n\n".encode("utf-8"))  # UTF-8 copy, C1 dash left in
    texts, labels = data.load_sentence_polarity(tmp_path)
    assert texts == ["a gorgeous film \u2013 truly .", "fun .", "bad caf\xe9 \u2014 ."] and labels == [1, 1, 0]
    with pytest.raises(data.DataError, match="rt-polarity.pos"):
        data.load_sentence_polarity(tmp_path / "nowhere")


def test_kfold_partition():
    folds = data.kfold_indices(23, k=5, seed=1)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(23))
    for tr, te in folds:
        assert not set(tr) & set(te) and len(tr) + len(te) == 23
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, data.kfold_indices(23, k=5, seed=1)))


def test_default_corpus(tmp_path):
    docs = data.default_corpus(cache_dir=tmp_path)
    assert sum(map(len, docs)) > 500_000 and all(d.strip() for d in docs)
    assert data.load_documents(None, cache_dir=tmp_path) == docs  # second call reads the cache back exactly
    assert "Return" in "".join(docs[:50])  # English prose, not code


def test_bpe_matches_naive_reference():
    # the incremental heap trainer must pick exactly what a from-scratch recount would (max count, then smallest pair)
    rng = random.Random(0)  # small alphabet and short words: lots of count ties to break
    text = " ".join("".join(rng.choice("abcde") for _ in range(rng.randint(1, 6))) for _ in range(1500))
    tok = data.Tokenizer.train(text, vocab_size=data.Tokenizer().vocab_size + 40)
    words = {}
    for w in tok._pat.findall(text):
        words[w] = words.get(w, 0) + 1
    seqs = {w: [tok.n_special + b for b in w.encode()] for w in words}
    merges = []
    for new_id in range(tok.n_special + 256, tok.vocab_size):
        counts = {}
        for w, s in seqs.items():
            for p in zip(s, s[1:]):
                counts[p] = counts.get(p, 0) + words[w]
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        seqs = {w: data._merge(s, best, new_id) for w, s in seqs.items()}
    assert len(merges) == 40 and tok.merges == merges


def test_shakespeare_offline_is_a_one_line_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError, match="--data FILE") as e:
        data.load_documents("shakespeare", cache_dir=tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tinyshakespeare.txt").write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n")
    expected = ["First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak."]
    assert data.load_documents("shakespeare", cache_dir=tmp_path) == expected


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
