"""The core's tests, in the order of mpnext.py's sections, then data.py and train.py; the lab's are in lab/. Run
both with `python -m pytest -q test_mpnext.py lab`.

Every claim is checked against a reference: torch.nn.functional, torch.optim, Hugging Face transformers' MPNet (tests
skip cleanly when it is not installed), closed forms, and information-flow tests for every attention mask.
"""

import ast
import copy
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import mpnext
import train
from mpnext import (AdamW, Lookahead, MPNext, MPNextConfig, RAdam, Ranger, Ranger21, SlowWeights, adam_denominator,
                    adaptive_clip_grad_, build_optimizer, centralize_gradient_, make_batch, normalize_gradient_,
                    relative_bucket, two_stream_mask)

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
# 1-3. configuration, activations and relative positions


def test_base_preset_is_mpnet_base():
    cfg = MPNextConfig.from_preset("base")
    model = MPNext(cfg)
    assert model.pos_emb.num_embeddings == 514 and cfg.layer_norm_eps == 1e-5 and cfg.vocab_size == 30527
    assert 109e6 < model.num_params() < 111e6  # MPNet-base: ~110M
    with pytest.raises(ValueError, match="unknown preset"):
        MPNextConfig.from_preset("huge")


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


def test_attention_bias_equals_the_bucket_lookup_and_its_gradient():
    """The per-distance lookup with its bincount backward gives what nn.Embedding gives on relative_bucket's buckets,
    masked: value and gradient, for permuted positions and distances beyond rel_max_distance."""
    model = MPNext(tiny_cfg(max_len=300, n_head=4)).double()
    q_pos = torch.stack([torch.randperm(300, generator=gen(s))[:17] for s in range(3)])  # (3, 17)
    k_pos = torch.stack([torch.randperm(300, generator=gen(s + 5))[:11] for s in range(3)])  # (3, 11)
    allowed = torch.rand(3, 1, 17, 11, generator=gen(2)) > 0.3
    ours = model.attention_bias(q_pos, k_pos, allowed, torch.float64)  # (4 heads, 3, 17, 11)
    ref = F.embedding(relative_bucket(q_pos, k_pos), model.rel_bias.weight).permute(3, 0, 1, 2)
    ref = ref.masked_fill(~allowed[:, 0], torch.finfo(torch.float64).min)
    assert torch.equal(ours, ref)
    grad = torch.randn(3, 17, 11, 4, dtype=torch.float64, generator=gen(1)).permute(3, 0, 1, 2)  # a strided grad
    g_ours, = torch.autograd.grad(ours, model.rel_bias.weight, grad)
    g_ref, = torch.autograd.grad(ref, model.rel_bias.weight, grad)
    assert torch.allclose(g_ours, g_ref, atol=1e-12, rtol=0) and g_ref.abs().sum() > 0


def test_local_bias_init_closed_form():
    cfg = tiny_cfg(n_head=4)
    w = MPNext(cfg).rel_bias.weight  # (32 buckets, 4 heads)
    assert torch.equal(w[0], torch.zeros(4)) and torch.equal(w[16], torch.zeros(4))  # distance 0
    assert torch.allclose(w[1], torch.tensor([-2.0, -1.0, -0.5, -0.25])) and torch.allclose(w[17], w[1])  # d = 1
    assert torch.allclose(w[3, 1], torch.tensor(-2.0))  # d = 3: -1 * log2(4)
    assert torch.allclose(w[8, 0], torch.tensor(-2 * math.log2(9)))  # first log bucket starts at d = 8
    torch.manual_seed(0)
    normal = MPNext(tiny_cfg(rel_init="normal")).rel_bias.weight
    assert abs(normal.std().item() - 0.02) < 0.01


def test_relative_bucket_matches_hf():
    pytest.importorskip("transformers")
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    pos = torch.arange(600)
    rel = pos[None, :] - pos[:, None]  # key - query, HF's convention
    assert torch.equal(relative_bucket(pos, pos), MPNetEncoder.relative_position_bucket(rel))


# ---------------------------------------------------------------------------------------------------------------------
# 4. two-stream attention masks


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
# 5. the model: information flow through the full stack


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


@pytest.mark.parametrize("kind,pre_ln,n_layer", [("mpnet", False, 3), ("plm", False, 3), ("mlm", False, 3),
                                                 ("mpnet", True, 3), ("mpnet", False, 1)])
def test_top_layer_on_the_loss_rows_alone_equals_the_full_stack(kind, pre_ln, n_layer):
    """When only the LM loss reads the output, the last layer computes the P loss rows alone (their keys and values
    still come from every content row): the loss and every gradient equal those of the full stack, padding included."""
    cfg = tiny_cfg(n_layer=n_layer, pre_ln=pre_ln, objective=kind)
    model = MPNext(cfg).double()
    ids = random_ids(3, 20, cfg=cfg)
    ids[1, 14:] = cfg.pad_id
    batch = make_batch(ids, cfg, gen(1))
    ids, P = batch["input_ids"], batch["targets"].shape[1]
    top_shapes = []
    hook = model.blocks[-1].register_forward_hook(lambda m, args, out: top_shapes.append(out.shape))
    loss, _ = model.loss(batch)
    hook.remove()
    assert top_shapes == [(3, P, cfg.d_model)]  # the fast path ran
    if kind == "mlm":  # the reference: every row through every layer, then the loss rows
        h = model.encode(ids, batch.get("attention_mask"))
        h = h.gather(1, batch["pred_positions"][..., None].expand(-1, -1, h.size(-1)))
    else:
        h = model.two_stream_encode(ids, batch["positions"], P, kind)[:, -P:]
    ref, _ = mpnext.token_loss(model.lm_head(h), batch["targets"])
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert torch.allclose(loss, ref, atol=1e-12, rtol=0)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None) and (g is None or torch.allclose(g, r, atol=1e-12, rtol=0))


def test_cpu_attention_equals_the_sdpa_branch(monkeypatch):
    """On a CPU the attention runs as baddbmm + softmax + bmm (faster than SDPA's fallback there); on other devices
    through SDPA. Both branches give the same output and gradients, for a bias shared by the batch and one per row;
    dropout on the attention probabilities changes the output and stays finite."""
    attn = mpnext.SelfAttention(tiny_cfg(n_head=4)).double()
    xq, xkv = torch.randn(3, 7, 32, dtype=torch.float64), torch.randn(3, 5, 32, dtype=torch.float64)
    for bias in (torch.randn(4, 1, 7, 5, dtype=torch.float64), torch.randn(4, 3, 7, 5, dtype=torch.float64)):
        bias.requires_grad_(True)
        outs = {}
        for explicit in (True, False):
            monkeypatch.setattr(mpnext, "EXPLICIT_CPU_ATTENTION", explicit)
            y = attn(xq, xkv, bias)
            outs[explicit] = (y, *torch.autograd.grad(y, [bias, attn.qkv.weight], torch.ones_like(y) + y.detach()))
        for ours, ref in zip(outs[True], outs[False]):
            assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    monkeypatch.setattr(mpnext, "EXPLICIT_CPU_ATTENTION", True)
    attn.attn_dropout = 0.5
    attn.train()
    torch.manual_seed(0)
    dropped = attn(xq, xkv, bias)
    assert not torch.allclose(dropped, outs[True][0]) and torch.isfinite(dropped).all()


@pytest.mark.parametrize("objective", ["mpnet", "mlm"])
def test_bf16_autocast_loss_is_finite_and_tracks_fp32(objective):
    """Under CPU bf16 autocast (the default where the CPU has bf16 matmuls) the loss of a padded batch stays finite and
    within 2% of fp32's, and every parameter gets a finite gradient."""
    cfg = tiny_cfg(n_layer=3, objective=objective)
    model = MPNext(cfg)
    ids = random_ids(4, 24, cfg=cfg)
    ids[2, 15:] = cfg.pad_id
    batch = make_batch(ids, cfg, gen(2))
    ref, _ = model.loss(batch)
    with torch.autocast("cpu", torch.bfloat16):
        loss, _ = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.02 * ref.item()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_query_gradient_never_reaches_own_content():
    """Gradient version of the leak test: d(query k output)/d(embedding of row p_k) == 0 for every k."""
    cfg = tiny_cfg()
    model = tiny_model()
    batch = two_stream_inputs(cfg, B=1, N=16)
    ids, pos, P = batch["input_ids"], batch["positions"], batch["targets"].shape[1]
    N = ids.shape[1] - 2 * P
    x = model.embed(ids, pos).detach().requires_grad_(True)
    out = model.run_layers(x, pos, pos[:, :N + P], two_stream_mask(N, P)[None, None])
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
# 5. the model: the one-call two-stream attention equals the paper's two separate attention calls


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
# 5. the model: Hugging Face parity


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
    with pytest.raises(ValueError, match="pre-ln"):
        tiny_model(pre_ln=True).to_hf(tmp_path)
    with pytest.raises(ValueError, match="padding id is 1"):
        tiny_model(pad_id=0, special_ids=(0, 2, 3, 119)).to_hf(tmp_path)


def test_models_trained_by_train_py_export_to_hf():
    tok = data.Tokenizer()  # MPNet's special ids: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4
    cfg = MPNextConfig(vocab_size=tok.vocab_size, pad_id=tok.pad_id, mask_id=tok.mask_id)
    assert cfg.special_ids == tuple(range(tok.n_special)) and cfg.pad_id == 1


# ---------------------------------------------------------------------------------------------------------------------
# 6. input builders


def test_builders_are_deterministic_under_a_seed():
    cfg = tiny_cfg(masking="word")
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
    cfg = tiny_cfg(masking="word", pred_ratio=0.3)
    B, N = 50, 40
    ids = random_ids(B, N, cfg=cfg)
    ws = torch.rand(B, N, generator=gen(1)) < 0.4
    ws[:, 0] = True
    b = make_batch(ids, cfg, gen(2), ws, objective="mlm")
    word = ws.long().cumsum(1) - 1
    cut = 0
    for r in range(B):
        pred = set(b["pred_positions"][r][b["targets"][r] != mpnext.IGNORE].tolist())  # real predictions only
        for w in word[r].unique():
            members = set((word[r] == w).nonzero()[:, 0].tolist())
            cut += 0 < len(members & pred) < len(members)
    assert cut == 0  # whole words only: the word cut by the budget is predicted whole or not at all


def test_loss_and_return_mlm():
    cfg = tiny_cfg(return_mlm=True)
    model = tiny_model(return_mlm=True)
    b = make_batch(random_ids(2, 20, cfg=cfg), cfg, gen(0))
    loss, metrics = model.loss(b)
    assert torch.allclose(loss, metrics["lm_loss"] + metrics["return_mlm_loss"])
    assert torch.equal(loss.detach(), metrics["loss"]) and "mlm_loss" not in metrics  # train.py's probe owns val_mlm_
    assert abs(metrics["lm_loss"].item() - math.log(cfg.vocab_size)) < 0.5  # untrained: about log V


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


# ---------------------------------------------------------------------------------------------------------------------
# 6. extra heads: ELECTRA replaced-token detection, SpanBERT span masking and span boundary objective


COMBOS = [(o, m, r, s) for o in ("mlm", "plm", "mpnet") for m in ("token", "word", "span") for r in (False, True)
          for s in (False, True)]


def word_starts(B, N, seed=1):
    ws = torch.rand(B, N, generator=gen(seed)) < 0.6
    ws[:, 0] = True
    return ws


@pytest.mark.parametrize("objective,masking,rtd,sbo", COMBOS)
def test_every_combination_trains_or_is_refused(objective, masking, rtd, sbo):
    kw = dict(objective=objective, masking=masking, rtd=rtd, sbo=sbo)
    if objective == "mlm" and rtd and sbo:  # the one refusal: the discriminator's boundary rows would see the span
        with pytest.raises(ValueError, match="leak the span") as e:
            tiny_model(**kw)
        assert "\n" not in str(e.value)
        return
    cfg, model = tiny_cfg(**kw), tiny_model(**kw).train()
    ids = random_ids(4, 32, cfg=cfg)
    ids[:, 0] = 0
    ids[3, 24:] = cfg.pad_id  # a padded row: fewer predictions, fillers in the layout
    batch = make_batch(ids, cfg, gen(1), word_starts(4, 32))  # one fixed batch
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, metrics = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], losses
    assert ("gen_loss" in metrics) == rtd and ("sbo_loss" in metrics) == sbo
    assert ("lm_loss" in metrics) == (not (objective == "mlm" and rtd))  # ELECTRA's discriminator has no LM loss


def test_truncated_geometric_span_lengths():
    p, L = 0.2, 10
    probs = torch.tensor([p * (1 - p) ** (k - 1) for k in range(1, L + 1)])
    probs /= probs.sum()
    mean = (probs * torch.arange(1, L + 1)).sum().item()
    assert abs(mean - 3.797) < 0.001  # SpanBERT: "mean 3.8"
    draws = mpnext.truncated_geometric((200_000,), p, L, gen(0))
    assert draws.min() == 1 and draws.max() == L
    freq = torch.bincount(draws, minlength=L + 1)[1:].float() / len(draws)
    assert (freq - probs).abs().max() < 0.005
    assert abs(draws.float().mean().item() - 3.8) < 0.2


def test_span_masking_whole_spans_within_budget():
    """Predicted spans: whole words only, lengths (in words) ~ the truncated geometric, about 15% of each row."""
    cfg = tiny_cfg(masking="span", max_len=512)
    B, N = 64, 512
    ids = random_ids(B, N, cfg=cfg)
    ws = word_starts(B, N)
    batch = make_batch(ids, cfg, gen(2), ws, objective="mlm")
    word = ws.long().cumsum(1) - 1
    valid = batch["targets"] != mpnext.IGNORE
    is_pred = torch.zeros(B, N, dtype=torch.bool).scatter(1, batch["pred_positions"], valid)
    n_pred = is_pred.sum(1)
    for r in range(B):  # never a piece of a word
        for w in word[r].unique():
            member = is_pred[r][word[r] == w]
            assert member.all() or not member.any()
    assert abs(n_pred.float().mean().item() / N - 0.15) < 0.01
    assert (n_pred - round(0.15 * N)).abs().max() <= 30  # at most about half of one long span off the budget
    # the chosen spans: units fully predicted, not cut by the row's end; their length in words
    unit = mpnext.masking_units(ids, cfg, gen(2), ws)  # the same first draw as make_batch
    lengths = []
    for r in range(B):
        for u in unit[r].unique()[:-1]:
            member = unit[r] == u
            if is_pred[r][member].all():
                lengths.append(len(word[r][member].unique()))
    assert len(lengths) > 500 and abs(sum(lengths) / len(lengths) - 3.8) < 0.2


def test_span_corruption_is_decided_once_per_span():
    cfg = tiny_cfg(masking="span", pred_ratio=0.3, max_len=256, vocab_size=100_000, mask_id=99_999,
                   special_ids=(0, 1, 2, 3, 99_999))
    ids = random_ids(32, 256, cfg=cfg)
    ws = word_starts(32, 256)
    b = make_batch(ids, cfg, gen(3), ws, objective="mlm")
    unit = mpnext.masking_units(ids, cfg, gen(3), ws)
    fed, t, pos = b["input_ids"].gather(1, b["pred_positions"]), b["targets"], b["pred_positions"]
    kind = torch.where(fed == cfg.mask_id, 0, torch.where(fed == t, 1, 2))  # mask / kept / random (or equal by chance)
    mixed = 0
    for r in range(32):
        units = unit[r].gather(0, pos[r])
        for u in units[t[r] != mpnext.IGNORE].unique():
            k = kind[r][(units == u) & (t[r] != mpnext.IGNORE)]
            mixed += len(k.unique()) > 1  # one decision for the whole span: all [MASK], all kept or all random
    assert mixed == 0 and set(kind[t != mpnext.IGNORE].unique().tolist()) == {0, 1, 2}
    assert abs((kind[t != mpnext.IGNORE] == 0).float().mean().item() - 0.8) < 0.06


def test_word_masking_without_word_starts_is_an_error():
    with pytest.raises(ValueError, match="word-start flags"):
        make_batch(random_ids(2, 20), tiny_cfg(masking="word"), gen(0))


def test_each_row_predicts_its_own_share():
    """Rows of very different lengths: each predicts round(0.15 x its real tokens), padding never predicted."""
    cfg = tiny_cfg(max_len=128)
    ids = random_ids(3, 128, cfg=cfg)
    ids[0, 10:] = cfg.pad_id
    ids[1, 60:] = cfg.pad_id
    for objective in ("mlm", "plm", "mpnet"):
        b = make_batch(ids, cfg, gen(0), objective=objective)
        valid = b["targets"] != mpnext.IGNORE
        assert valid.sum(1).tolist() == [round(0.15 * 10), round(0.15 * 60), round(0.15 * 128)]
        assert not torch.isin(b["targets"][valid], torch.tensor(cfg.special_ids)).any()


def electra_batch(cfg, ids, seed=0, objective=None):
    return make_batch(ids, cfg, gen(seed), word_starts(*ids.shape), objective=objective)


@pytest.mark.parametrize("objective", ["mlm", "mpnet", "plm"])
def test_rtd_labels_follow_token_inequality(objective):
    """A sample equal to the original is labelled original; every other replaced slot is labelled replaced."""
    cfg = tiny_cfg(rtd=True, objective=objective, mask_prob=1.0, random_prob=0.0)
    model = tiny_model(rtd=True, objective=objective)
    ids = torch.full((4, 40), 50)
    ids[:, 0] = 0
    batch = electra_batch(cfg, ids)
    for favourite, expect_replaced in ((50, False), (60, True)):
        with torch.no_grad():
            model.generator.head_bias.zero_()
            model.generator.head_bias[favourite] = 100.0  # the generator samples `favourite` everywhere
        new_ids, replaced = model.replace_tokens(batch, {}, {})
        assert torch.equal(replaced, new_ids != batch["input_ids"])  # labels == the token changed
        n_slots = (batch["rtd_targets"] != mpnext.IGNORE).sum()
        assert replaced.sum() == (n_slots if expect_replaced else 0) and n_slots > 0


def test_disc_auc_equals_pairwise_count():
    g = gen(7)
    scores, positive, scored = torch.randn(4, 30, generator=g), torch.rand(4, 30, generator=g) < 0.2, \
        torch.rand(4, 30, generator=g) < 0.8
    positive &= scored
    pos, neg = scores[positive], scores[scored & ~positive]
    assert torch.allclose(mpnext.auc(scores, positive, scored), (pos[:, None] > neg[None, :]).float().mean())


def test_rtd_samples_are_never_special():
    cfg = tiny_cfg(rtd=True)
    model = tiny_model(rtd=True)
    with torch.no_grad():
        model.generator.head_bias[list(cfg.special_ids)] = 100.0  # the generator wants specials most
    batch = electra_batch(cfg, random_ids(8, 40, cfg=cfg))
    new_ids, replaced = model.replace_tokens(batch, {}, {})
    slots = batch["rtd_slots"][batch["rtd_targets"] != mpnext.IGNORE]
    rows = torch.arange(8)[:, None].expand_as(batch["rtd_slots"])[batch["rtd_targets"] != mpnext.IGNORE]
    assert not torch.isin(new_ids[rows, slots], torch.tensor(cfg.special_ids)).any()


@pytest.mark.parametrize("objective", ["mlm", "mpnet"])
def test_generator_gets_no_gradient_from_the_discriminator(objective):
    """The generator's own weights get the same gradient whatever rtd_weight is: none comes from the disc loss.
    (The shared embeddings do get both, as in ELECTRA.)"""
    grads = []
    for w in (1.0, 100.0):
        cfg = tiny_cfg(rtd=True, rtd_weight=w, objective=objective)
        model = tiny_model(rtd=True, rtd_weight=w, objective=objective)
        loss, _ = model.loss(electra_batch(cfg, random_ids(4, 40, cfg=cfg)))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    own = [n for n in grads[0] if n.startswith("generator.")]
    assert own and all(torch.equal(grads[0][n], grads[1][n]) for n in own)
    assert not torch.allclose(grads[0]["disc.dense.weight"], grads[1]["disc.dense.weight"])
    assert not torch.allclose(grads[0]["tok_emb.weight"], grads[1]["tok_emb.weight"])


def head_outputs(model, batch, kind):
    """Everything the heads compute, row by row: query logits, generator logits, discriminator logits, SBO logits."""
    P = batch["targets"].shape[1]
    ids = model.replace_tokens(batch, {}, {})[0] if "rtd_targets" in batch else batch["input_ids"]
    h = model.two_stream_encode(ids, batch["positions"], P, kind)
    out = {"query": model.lm_head(h[:, -P:])}
    if "rtd_scored" in batch:
        out["disc"] = model.disc(h[:, :batch["rtd_scored"].shape[1]])
        out["generator"] = model.generator(batch["gen_ids"], batch["gen_attention_mask"])
    rows = [h.gather(1, batch[k][..., None].expand(-1, -1, h.size(-1))) for k in ("sbo_left", "sbo_right")]
    out["sbo"] = F.linear(model.sbo(*rows, batch["sbo_offset"]), model.tok_emb.weight, model.sbo.bias)
    return out


@pytest.mark.parametrize("kind,rtd", [("mpnet", True), ("plm", True), ("mpnet", False), ("plm", False)])
def test_heads_keep_the_leakage_guarantee(kind, rtd):
    """Change the original token of the k-th prediction and rebuild the batch with the same seed (mask copies all
    [MASK], so only content changes): query outputs 1..k, every discriminator logit and every SBO logit stay the
    same, through the generator, its samples and the span boundaries; later queries change."""
    kw = dict(objective=kind, masking="span", rtd=rtd, sbo=True, mask_prob=1.0, random_prob=0.0, n_layer=3)
    cfg, model = tiny_cfg(**kw), tiny_model(**kw)
    ids = random_ids(2, 64, cfg=cfg)
    ids[:, 0] = 0
    ws = word_starts(2, 64)
    batch = make_batch(ids, cfg, gen(4), ws)
    P = batch["targets"].shape[1]
    pred, valid = batch["positions"][:, -P:], batch["targets"] != mpnext.IGNORE
    assert (batch["sbo_targets"] != mpnext.IGNORE).sum() > 0 and not valid.all()  # fillers in the layout too
    with torch.no_grad():
        before = head_outputs(model, batch, kind)
        for k in range(P):  # rows whose slot k is a filler (a visible token) keep their tokens
            other = ids.gather(1, pred[:, k:k + 1]) % 100 + 5  # another ordinary token
            here = pred[:, k:k + 1]
            ids2 = ids.scatter(1, here, torch.where(valid[:, k:k + 1], other, ids.gather(1, here)))
            b2 = make_batch(ids2, cfg, gen(4), ws)
            assert torch.equal(b2["positions"], batch["positions"])  # the same draw: same layout
            after = head_outputs(model, b2, kind)
            assert torch.equal(before["query"][:, :k + 1], after["query"][:, :k + 1]), k
            if k + 1 < P and valid[:, k].any():  # later queries do see p_k (untrained weights: a small change)
                assert not torch.equal(before["query"][:, k + 1:], after["query"][:, k + 1:])
            for head in ("generator", "disc", "sbo"):  # the generator: its whole input and every logit
                if head in before:
                    assert torch.equal(before[head], after[head]), (head, k)


def test_sbo_boundaries_are_never_predicted():
    cfg = tiny_cfg(masking="span", sbo=True, pred_ratio=0.3)
    ids = random_ids(8, 60, cfg=cfg)
    ws = word_starts(8, 60)
    for objective in ("mlm", "mpnet", "plm"):
        b = make_batch(ids, cfg, gen(5), ws, objective=objective)
        ok = b["sbo_targets"] != mpnext.IGNORE
        P = b["targets"].shape[1]
        if objective == "mlm":
            valid = b["targets"] != mpnext.IGNORE
            is_pred = torch.zeros(8, 60, dtype=torch.bool).scatter(1, b["pred_positions"], valid)
            rows = torch.arange(8)[:, None].expand_as(ok)[ok]
            assert not is_pred[rows, b["sbo_left"][ok]].any() and not is_pred[rows, b["sbo_right"][ok]].any()
        else:
            W = b["input_ids"].shape[1] - (3 if objective == "mpnet" else 2) * P
            assert (b["sbo_left"][ok] < W).all() and (b["sbo_right"][ok] < W).all()  # non-predicted content rows
        assert ok.sum() > 0.5 * (b["targets"] != mpnext.IGNORE).sum()


def test_models_with_heads_export_their_main_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(3, rtd=True, sbo=True, vocab_size=130, mask_id=129, special_ids=(0, 1, 2, 3, 129))
    model.to_hf(tmp_path)
    hf = transformers.MPNetForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, 129, (2, 21), generator=gen(5))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-5, rtol=0)
    back = MPNext.from_hf(hf, mask_id=129, rtd=True, sbo=True)  # fresh heads around the imported encoder
    assert hasattr(back, "generator") and hasattr(back, "sbo")


def test_generator_shares_the_embeddings():
    model = tiny_model(rtd=True)
    g = model.generator
    assert g.tok_emb is model.tok_emb and g.pos_emb is model.pos_emb and g.emb_ln is model.emb_ln
    assert g.cfg.d_model == 8 and g.cfg.n_layer == model.cfg.n_layer and g.cfg.d_ff == 32
    assert isinstance(g.emb_proj, nn.Linear) and g.head_dense.out_features == model.cfg.d_model
    assert mpnext.generator_config(tiny_cfg(d_model=768, n_head=12)).n_head == 3  # 192 wide, heads of 64


# ---------------------------------------------------------------------------------------------------------------------
# 7. fine-tuning: the classification head


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_classification_loss_is_cross_entropy_and_padding_never_leaks(pooling):
    model = tiny_model(n_classes=3, pooling=pooling)
    ids = random_ids(4, 12)
    ids[1, 7:] = 1  # pads
    ids[1, 6] = 2
    mask = (ids != 1).long()
    labels = torch.tensor([0, 2, 1, 0])
    loss, m = model.loss({"kind": "cls", "input_ids": ids, "attention_mask": mask, "labels": labels})
    logits = model.classify(ids, mask)
    assert torch.allclose(loss, F.cross_entropy(logits, labels))
    assert m["acc"] == (logits.argmax(-1) == labels).float().mean()
    # row 1 classified alone, without its padding, gives the same logits: pads never reach a real token or the pool
    alone = model.classify(ids[1:2, :7], mask[1:2, :7])
    assert torch.allclose(alone, logits[1:2], atol=1e-5)
    # and what sits in padded slots does not matter
    ids2 = ids.clone()
    ids2[1, 7:] = 1
    assert torch.equal(model.classify(ids2, mask), logits)


def test_classification_head_equals_hf_mpnet_for_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(n_classes=3)
    for p in model.classifier.parameters():  # not the zero-bias init: a real check
        nn.init.normal_(p, std=0.5)
    model.to_hf(tmp_path / "hf")
    hf = transformers.MPNetForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=3).eval()
    hf.classifier.load_state_dict({"dense.weight": model.classifier.dense.weight,
                                   "dense.bias": model.classifier.dense.bias,
                                   "out_proj.weight": model.classifier.out_proj.weight,
                                   "out_proj.bias": model.classifier.out_proj.bias})
    ids = random_ids(3, 10)
    ids[2, 6:] = 1
    mask = (ids != 1).long()
    with torch.no_grad():
        assert torch.allclose(model.classify(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 8. optimizers


SHAPES = [(4, 3), (3,), (2, 3, 2, 2), (5,)]


def make_params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def make_groups(params):
    # several groups with different lr / weight decay; the last one uses the constructor defaults
    return [{'params': [params[0]], 'lr': 1e-2, 'weight_decay': 0.1},
            {'params': [params[1], params[2]], 'lr': 3e-3, 'weight_decay': 0.0},
            {'params': [params[3]]}]


def run_noisy_quadratic(params, opt, steps, seed=1):
    """Deterministic noisy quadratic: grad = a * (theta - c) + noise, noise drawn in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for i, p in enumerate(params):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.grad = (i + 1) * (p.detach() - 0.5) + noise
        opt.step()
    return params


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def compare_with_torch(ours, theirs, steps=300):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-6)):
        p1, p2 = make_params(dtype), make_params(dtype)
        run_noisy_quadratic(p1, ours(make_groups(p1)), steps)
        run_noisy_quadratic(p2, theirs(make_groups(p2)), steps)
        assert max_diff(p1, p2) < tol, (dtype, max_diff(p1, p2))


def test_adamw_matches_torch():
    compare_with_torch(lambda g: AdamW(g, lr=2e-3, weight_decay=0.05),
                       lambda g: torch.optim.AdamW(g, lr=2e-3, weight_decay=0.05, foreach=False))


def test_radam_matches_torch_both_weight_decay_modes():
    for decoupled in (False, True):
        compare_with_torch(lambda g, d=decoupled: RAdam(g, lr=2e-3, weight_decay=0.05, decoupled_weight_decay=d),
                           lambda g, d=decoupled: torch.optim.RAdam(g, lr=2e-3, weight_decay=0.05, foreach=False,
                                                                    decoupled_weight_decay=d))


def test_ranger21_all_off_equals_torch_adamw():
    off = dict(use_warmup=False, warmdown_active=False, lookahead_active=False, stable_weight_decay=False,
               normloss_active=False, pnm=False, amsgrad=False, softplus=False, gc=False, norm_gc=False, agc=False)
    compare_with_torch(lambda g: Ranger21(g, lr=2e-3, weight_decay=0.05, **off),
                       lambda g: torch.optim.AdamW(g, lr=2e-3, weight_decay=0.05, foreach=False))


def test_adam_closed_forms():
    # step 1: delta = -lr * g / (|g| + eps); zero grads: theta_t = theta_0 * (1 - lr*lam)^t
    p = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.5, -1e-3, 4.0], dtype=torch.float64)
    opt = AdamW([p], lr=0.1, eps=1e-8, weight_decay=0.0)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
                               - 0.1 * g / (g.abs() + 1e-8), rtol=0, atol=1e-15)
    q = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = AdamW([q], lr=0.1, weight_decay=0.2)
    for _ in range(7):
        q.grad = torch.zeros_like(q)
        opt.step()
    torch.testing.assert_close(q.detach(), torch.full((3,), 0.98 ** 7, dtype=torch.float64), rtol=1e-14, atol=0)


def test_radam_constant_gradient_trajectory():
    # constant g: m_hat = g exactly, so t <= 5 moves lr*g (SGD branch); t = 6 moves lr*r_6*g/(|g| + eps/sqrt(bc2))
    lr, eps, b2 = 0.01, 1e-8, 0.999
    g = torch.tensor([0.3, -2.0], dtype=torch.float64)
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = RAdam([p], lr=lr, eps=eps)
    for t in range(1, 7):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        if t <= 5:
            torch.testing.assert_close(p.detach() - before, -lr * g, rtol=1e-12, atol=0)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * 6 * b2 ** 6 / (1 - b2 ** 6)
    r6 = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    expected = -lr * r6 * g / (g.abs() + eps / math.sqrt(1 - b2 ** 6))
    torch.testing.assert_close(p.detach() - before, expected, rtol=1e-12, atol=0)


def test_radam_no_update_while_not_rectified():
    p = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    start = p.detach().clone()
    opt = RAdam([p], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True, degenerated_to_sgd=False)
    for t in range(1, 7):
        p.grad = torch.randn(4, 3, dtype=torch.float64)
        opt.step()
        assert torch.equal(p.detach(), start) == (t <= 5), t
    assert opt.state[p]['step'] == 6 and opt.state[p]['exp_avg'].abs().sum() > 0  # moments still accumulate


def test_lookahead_closed_form_sgd_quadratic():
    # f = x^2/2, SGD(lr): x <- (1-lr) x; after each k-step cycle x <- 1 - alpha + alpha (1-lr)^k times the slow weight
    for lr, k, alpha in ((0.5, 5, 0.5), (0.1, 3, 0.8)):
        x = torch.ones(1, dtype=torch.float64, requires_grad=True)
        la = Lookahead(torch.optim.SGD([x], lr=lr), k=k, alpha=alpha)
        for n in range(1, 4):
            for i in range(k):
                x.grad = x.detach().clone()
                la.step()
                if i == k - 2:  # mid-cycle: fast weights moved, slow weights did not
                    assert la.state[x]['slow_param'].item() == (1 - alpha + alpha * (1 - lr) ** k) ** (n - 1)
            expected = (1 - alpha + alpha * (1 - lr) ** k) ** n
            if lr == 0.5:  # dyadic numbers: every operation is exact
                assert x.item() == expected and la.state[x]['slow_param'].item() == expected
            else:
                assert abs(x.item() - expected) < 1e-14


def test_lookahead_alpha_one_is_inner_optimizer():
    p1, p2 = make_params(torch.float64), make_params(torch.float64)
    run_noisy_quadratic(p1, Lookahead(AdamW(make_groups(p1), lr=1e-2), k=3, alpha=1.0), 20)
    run_noisy_quadratic(p2, AdamW(make_groups(p2), lr=1e-2), 20)
    assert max_diff(p1, p2) == 0.0


def test_lookahead_slow_weights_context_and_scheduler():
    p = torch.zeros(3, requires_grad=True)
    la = Lookahead(AdamW([p], lr=0.1, weight_decay=0.0), k=5)
    sched = torch.optim.lr_scheduler.LambdaLR(la, lambda s: 0.5 ** s)
    for _ in range(3):
        p.grad = torch.ones(3)
        la.step()
        sched.step()
    assert la.optimizer.param_groups[0]['lr'] == 0.1 * 0.5 ** 3  # the scheduler reaches the inner optimizer
    fast = p.detach().clone()
    with la.slow_weights():
        assert torch.equal(p.detach(), torch.zeros(3))            # phi = theta_0 until the first sync
    assert torch.equal(p.detach(), fast)
    assert la.param_groups[0]['la_step'] == 3


def test_lookahead_with_grad_scaler():
    # GradScaler.step unscales first, so AGC/GC see true gradients; it reaches the inner optimizer through the wrapper
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, 'adamw', 1e-2, 0.1, lookahead=True)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    before = model.weight.detach().clone()
    for _ in range(6):
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 3)).pow(2).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.param_groups[0]['la_step'] == 6 and not torch.equal(model.weight.detach(), before)


def test_gradient_centralization():
    g = torch.Generator().manual_seed(0)
    for shape in ((6, 5), (4, 3, 3, 3), (3, 4, 5)):
        x = torch.randn(shape, generator=g)
        y = centralize_gradient_(x.clone())
        assert y.mean(dim=tuple(range(1, y.dim()))).abs().max() < 1e-6   # every row has zero mean
        torch.testing.assert_close(centralize_gradient_(y.clone()), y, rtol=0, atol=1e-6)  # idempotent
    b = torch.randn(7, generator=g)
    assert torch.equal(centralize_gradient_(b.clone()), b)                # 1-D (bias, LayerNorm) untouched
    w2, w4 = torch.randn(6, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    assert torch.equal(centralize_gradient_(w2.clone(), conv_only=True), w2)   # GCC: Linear weights untouched
    assert torch.equal(centralize_gradient_(b.clone(), conv_only=True), b)
    assert not torch.equal(centralize_gradient_(w4.clone(), conv_only=True), w4)  # conv kernels centralized


def test_normalized_gradient():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) * 7
    std = x.std()
    torch.testing.assert_close(normalize_gradient_(x.clone()).std(), std / (std + 1e-8), rtol=1e-6, atol=0)
    small = torch.tensor([3.0, -1.0])
    assert torch.equal(normalize_gradient_(small.clone()), small)


def test_adaptive_gradient_clipping():
    lam, eps = 0.01, 1e-3
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.6, 0.8]], requires_grad=True)  # row norms 5, 0, 1, 1
    g = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.003, 0.004], [-2.0, 1.0]])               # ratios 2, 1e3, 5e-3, >
    w.grad = g.clone()
    adaptive_clip_grad_(w, lam, eps)
    norms = w.grad.norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3]], torch.tensor([lam * 5, lam * eps, lam * 1]), rtol=1e-6, atol=0)
    assert torch.equal(w.grad[2], g[2])                                       # ratio 5e-3 < lambda: untouched
    torch.testing.assert_close(w.grad[0] / norms[0], g[0] / g[0].norm())      # direction kept
    # inside an optimizer: every group is clipped except the one flagged agc_exempt (the output layer)
    torch.manual_seed(0)
    body, head = nn.Linear(4, 4), nn.Linear(4, 2)
    (head(body(torch.randn(8, 4))) ** 2).sum().mul(100).backward()
    head_grads, body_grad = [p.grad.clone() for p in head.parameters()], body.weight.grad.clone()
    body_w = body.weight.detach().clone()
    opt = AdamW([{'params': body.parameters()}, {'params': head.parameters(), 'agc_exempt': True}], agc=True)
    opt.step()
    assert all(torch.equal(p.grad, h) for p, h in zip(head.parameters(), head_grads))
    ratio = body.weight.grad.norm(dim=1) / body_w.norm(dim=1).clamp(min=eps)
    assert not torch.equal(body.weight.grad, body_grad) and ratio.max() < lam * 1.001


def test_ranger21_schedule_multipliers():
    p = torch.zeros(2, requires_grad=True)
    opt = Ranger21([p], lr=1e-3, num_iterations=10000)
    group = opt.param_groups[0]
    assert group['num_warmup_iterations'] == 2000                          # ceil(2 / (1 - 0.999))
    lr = opt.scheduled_lr
    start = 7200                                                            # int(0.72 * 10000)
    expected = {1: 1e-3 / 2000, 1000: 0.5e-3, 2000: 1e-3, 7199: 1e-3,
                7201: 1e-3 - (1e-3 - 3e-5) * (7202 - start) / (10000 - start + 1),
                8600: 1e-3 - (1e-3 - 3e-5) * (8601 - start) / 2801, 10000: 3e-5, 12000: 3e-5}
    for t, want in expected.items():
        assert abs(lr(group, t) - want) < 1e-15, (t, lr(group, t), want)
    assert abs(lr(group, 7201) - 9.993e-4) < 1e-7 and abs(lr(group, 8600) - 5.148e-4) < 1e-7
    short = Ranger21([p], lr=1e-3, num_iterations=1000).param_groups[0]     # 2000 > 45% of 1000: use 22%
    assert short['num_warmup_iterations'] == 220


def test_ranger21_warmup_drives_the_first_step():
    p = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    opt = Ranger21([p], lr=1e-2, num_iterations=100, betas=(0.9, 0.98), weight_decay=0.0, warmdown_active=False,
                   lookahead_active=False, pnm=False, amsgrad=False, softplus=False, gc=False, norm_gc=False,
                   agc=False)
    p.grad = torch.tensor([0.5, 2.0], dtype=torch.float64)
    opt.step()
    w = opt.param_groups[0]['num_warmup_iterations']                        # ceil(2/0.02) = 100 > 45: 22
    assert w == 22
    expected = torch.tensor([1.0, -1.0], dtype=torch.float64) - 1e-2 / w * p.grad / (p.grad.abs() + 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)


def test_ranger21_fixed_bugs():
    # weight decay reaches EVERY tensor of the group (zero grads, plain decoupled decay: theta_0 (1 - lr lam)^t)
    params = make_params(torch.float64)
    start = [p.detach().clone() for p in params]
    opt = Ranger21(params, lr=0.1, weight_decay=0.5, use_warmup=False, warmdown_active=False, lookahead_active=False,
                   stable_weight_decay=False, normloss_active=False, gc=False, norm_gc=False, agc=False)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, s in zip(params, start):
        torch.testing.assert_close(p.detach(), s * 0.95 ** 3, rtol=1e-14, atol=0)
    # the PNM factor is used, and AMSGrad keeps a real running max
    finals = []
    for beta0 in (1.0, 0.3):
        params = make_params(torch.float64)
        opt = Ranger21(params, lr=1e-2, num_iterations=50, pnm_momentum_factor=beta0)
        run_noisy_quadratic(params, opt, 10)
        finals.append(params)
        st = opt.state[params[0]]
        assert (st['max_exp_avg_sq'] >= st['exp_avg_sq']).all() and st['max_exp_avg_sq'].sum() > 0
    assert max_diff(*finals) > 1e-6


def test_softplus_denominator():
    d = adam_denominator(torch.tensor([0.0, 0.01, 1.0]), bc2=1.0, eps=0.0, softplus_beta=50.0)
    torch.testing.assert_close(d, torch.tensor([math.log(2) / 50, 0.1 + math.log1p(math.exp(-5)) / 50, 1.0]))


class Tiny(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        return self.head(self.ln(self.body(self.emb(idx))))


def test_build_optimizer_param_groups():
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, 'adamw', lr=1e-3, weight_decay=0.1, output_layer_names=('head',))
    by_param = build_optimizer(model, 'adamw', 1e-3, 0.1, output_layer_names=('emb', 'head.bias'))  # param names too
    assert [(len(g['params']), g['agc_exempt']) for g in by_param.param_groups] == [(2, False), (4, False), (2, True)]
    ids = lambda ps: {id(p) for p in ps}
    by_key = {(g['weight_decay'] > 0, g['agc_exempt']): ids(g['params']) for g in opt.param_groups}
    m = model
    assert by_key[(True, False)] == ids([m.body[0].weight, m.body[2].weight])
    assert by_key[(False, False)] == ids([m.body[0].bias, m.body[2].bias, m.ln.weight, m.ln.bias])
    assert by_key[(False, True)] == ids([m.emb.weight, m.head.bias])   # tied head/embedding weight: no decay
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))
    assert [g['weight_decay'] for g in opt.param_groups] == [0.1, 0.0, 0.0]
    assert type(opt) is AdamW and not opt.param_groups[0]['gc']
    la = build_optimizer(model, 'radam', 1e-3, 0.1, lookahead=True, gc=True)
    assert type(la) is Lookahead and type(la.optimizer) is RAdam and la.param_groups[0]['gc']
    assert not la.param_groups[-1]['gc']                                 # never centralize embeddings
    assert type(build_optimizer(model, 'ranger', 1e-3, 0.1, lookahead=True).optimizer) is RAdam  # not double wrapped
    r21 = build_optimizer(model, 'ranger21', 1e-3, 0.1, lookahead=True, num_iterations=100)
    assert type(r21) is Ranger21 and r21.param_groups[0]['num_warmup_iterations'] == 22  # ceil(2/0.02) > 45
    for bad in (dict(name='sgd'), dict(name='adamw', output_layer_names=('nope',)), dict(name='ranger21')):
        try:
            build_optimizer(model, lr=1e-3, weight_decay=0.1, **bad)
        except ValueError:
            continue
        raise AssertionError(bad)


OPTIMIZERS = {
    'adamw': lambda m: build_optimizer(m, 'adamw', 1e-2, 0.1, gc=True),
    'radam': lambda m: build_optimizer(m, 'radam', 1e-2, 0.1),
    'ranger': lambda m: build_optimizer(m, 'ranger', 1e-2, 0.1),
    'ranger21': lambda m: build_optimizer(m, 'ranger21', 1e-2, 0.1, num_iterations=13, output_layer_names=('head',)),
    'lookahead(adamw)': lambda m: Lookahead(AdamW(m.parameters(), lr=1e-2), k=5),
    'ranger(+agc)': lambda m: Ranger(m.parameters(), lr=1e-2, weight_decay=0.01, agc=True),
    'lookahead(torch adamw)': lambda m: Lookahead(torch.optim.AdamW(m.parameters(), lr=1e-2), k=5),
}


def train_steps(model, opt, batches):
    for idx in batches:
        opt.zero_grad()
        logits = model(idx)
        nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), idx.roll(1, 1).view(-1)).backward()
        opt.step()


def test_save_load_continue_is_bitwise_identical():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 11, (4, 6), generator=g) for _ in range(13)]
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = Tiny()
        reference = copy.deepcopy(model)
        train_steps(reference, make(reference), batches)           # uninterrupted: 13 steps
        opt = make(model)
        train_steps(model, opt, batches[:7])                       # stop at step 7 (mid lookahead cycle)
        buf = io.BytesIO()
        torch.save({'model': model.state_dict(), 'opt': opt.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        torch.manual_seed(1)
        fresh = Tiny()                                             # a fresh model and a fresh optimizer
        fresh.load_state_dict(ckpt['model'])
        fresh_opt = make(fresh)
        fresh_opt.load_state_dict(ckpt['opt'])
        train_steps(fresh, fresh_opt, batches[7:])
        for (n, a), b in zip(reference.named_parameters(), fresh.parameters()):
            assert torch.equal(a, b), (name, n)
        if isinstance(fresh_opt, Lookahead):
            assert fresh_opt.param_groups[0]['la_step'] == 13
            clone = copy.deepcopy(fresh_opt)  # deepcopy / pickle keep the wrapper intact
            assert clone.param_groups[0]['la_step'] == 13 and len(clone.state) == len(fresh_opt.state)


def test_every_optimizer_decreases_loss():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 11, (8, 6), generator=g) for _ in range(4)] * 30
    for name, make in OPTIMIZERS.items():
        if name == 'ranger21':
            make = lambda m: build_optimizer(m, 'ranger21', 3e-2, 0.01, num_iterations=len(batches))
        torch.manual_seed(0)
        model = Tiny()
        def loss():
            return sum(nn.functional.cross_entropy(model(i).view(-1, 11), i.roll(1, 1).view(-1)).item()
                       for i in batches[:4])
        before = loss()
        train_steps(model, make(model), batches)
        after = loss()
        assert math.isfinite(after) and after < 0.7 * before, (name, before, after)


def test_slow_weights_on_ranger21():
    torch.manual_seed(0)
    model = Tiny()
    opt = Ranger21(model.parameters(), lr=1e-2, num_iterations=20)
    train_steps(model, opt, [torch.randint(0, 11, (4, 6)) for _ in range(3)])
    fast = [p.detach().clone() for p in model.parameters()]
    with SlowWeights(opt):
        assert all(torch.equal(p, opt.state[p]['slow_param']) for p in model.parameters())
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))


# ---------------------------------------------------------------------------------------------------------------------
# 9. learning-rate schedules


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
    assert [t.decode([i]) for i in t.encode("aaabdaaabac")] == ["aaab", "d", "aaab", "a", "c"]


@pytest.mark.parametrize("s", ["", "a", " ", "hello world", "  leading and trailing  ", "\n\n\n", "a\r\nb\r\n",
                               "\ttab\t\tx", "NUL\x00byte", "naïve café", "日本語",
                               "emoji 👍🏽 🤖!",
                               "x_y__z 12345 1.5e-3", "<mask> <s> </s> are plain text", "don't we'll I'VE"])
def test_roundtrip(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert all(i >= tok.n_special for i in ids)  # plain text never produces special ids


def test_specials_and_decode(tok):
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.mask_id, tok.n_special) == (0, 1, 2, 4, 5)  # MPNet's ids
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
    piece = {t.decode([i]): i for i in range(t.vocab_size)}
    assert t.word_start[[piece[" the"], piece[" thing"], piece[","], piece["\n"], t.mask_id]].all()
    assert not t.word_start[[piece["the"], piece["ing"], piece["a"], piece["7"]]].any()
    assert not t.word_start[t.n_special + 0xC3]  # UTF-8 lead byte: letters like "é" continue a word
    ids = np.array(t.encode("the thing\nthe thing") + [t.eos_id] + t.encode("singing"))
    pieces = [t.decode([i]) for i in ids]
    assert pieces == ["the", " thing", "\n", "the", " thing", "</s>", "s", "inging"]
    flags = data.word_start_flags(ids, t)
    # "the" starts a line and "s" a document: forced True although the table says "continuation"
    assert flags.tolist() == [True, True, True, True, True, True, True, False]
    rows = data.word_start_flags(ids.reshape(1, -1), t)  # (B, T) rows alike
    assert rows.dtype == bool and rows[0].tolist() == flags.tolist()
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
    assert torch.equal(f1, torch.from_numpy(data.word_start_flags(x1.numpy(), tok)))  # as computed on the rows
    text = tok.decode(x1[0, 1:])
    assert text in tok.decode(stream)  # rows are consecutive stream tokens
    rows = [x for x, _ in batches.iterate()]
    assert sum(len(r) for r in rows) == len(stream) // 15  # every full block of 15 stream tokens, in order
    covered = torch.cat(rows)[:, 1:].reshape(-1)
    n = len(stream) // 15 * 15
    assert torch.equal(covered, torch.from_numpy(stream[:n].astype(np.int64)))
    with pytest.raises(data.DataError, match="shorter than one block"):
        data.Batches(stream[:10], tok, seq_len=16, batch_size=4, name="val")


def test_encode_documents_cache(tok, tmp_path, monkeypatch):
    docs = ["first document here.", "and a second one"]
    path = tmp_path / "stream.npz"
    s1 = data.encode_documents(docs, tok, cache_path=path)
    assert s1.tolist() == tok.encode(docs[0]) + [tok.eos_id] + tok.encode(docs[1]) + [tok.eos_id]
    monkeypatch.setattr(tok, "encode", lambda text: pytest.fail("cache not used"))
    assert np.array_equal(data.encode_documents(docs, tok, cache_path=path), s1)
    monkeypatch.undo()
    other = data.Tokenizer.train("first document", vocab_size=data.Tokenizer().vocab_size + 5)
    s2 = data.encode_documents(docs, other, cache_path=path)  # different tokenizer -> rebuilt
    assert s2.tolist() == other.encode(docs[0]) + [2] + other.encode(docs[1]) + [2]


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


def test_encode_with_specials():
    tok = data.Tokenizer.train("the cat sat on the mat. " * 50, vocab_size=300)
    ids = tok.encode("<s>the <mask> sat</s>", specials=True)
    assert ids == [tok.bos_id] + tok.encode("the") + [tok.mask_id] + tok.encode(" sat") + [tok.eos_id]
    assert tok.mask_id not in tok.encode("the <mask> sat")  # plain encode never emits specials
    assert tok.encode("a<pad><unk>", specials=True) == tok.encode("a") + [tok.pad_id, tok.unk_id]


# ---------------------------------------------------------------------------------------------------------------------
# train.py: end to end, checkpoints, resume, user errors


HERE = os.path.dirname(os.path.abspath(__file__))


def toy_corpus(path, n_docs=12, seed=0):
    """Small pseudo-English with real structure (a subject-verb-object grammar), written as a directory of .txt files."""
    rng = random.Random(seed)
    nouns = "cat dog bird fish horse king queen child farmer sailor river tree house ship garden".split()
    verbs = "sees finds likes follows paints feeds carries watches builds hears".split()
    adjs = "old young red green small large quiet happy dark bright".split()
    os.makedirs(path, exist_ok=True)
    for d in range(n_docs):
        sents = []
        for _ in range(120):
            a, b = rng.choice(nouns), rng.choice(nouns)
            sents.append(f"The {rng.choice(adjs)} {a} {rng.choice(verbs)} the {rng.choice(adjs)} {b}.")
        with open(os.path.join(path, f"doc{d:02d}.txt"), "w") as f:
            f.write(" ".join(sents) + "\n")
    return str(path)


TINY_ARGS = ["--preset", "tiny", "--n-layer", "2", "--d-model", "64", "--n-head", "2", "--d-ff", "128", "--vocab", "320",
             "--batch-size", "8", "--seq-len", "32", "--eval-batches", "2", "--samples", "1", "--log-every", "1",
             "--warmup-steps", "5", "--lr", "3e-3"]


def run_train(tmp_path, *extra, out="out"):
    argv = ["--data", toy_corpus(tmp_path / "corpus"), "--out-dir", str(tmp_path / out), *TINY_ARGS, *extra]
    assert train.main(argv) == 0
    return tmp_path / out


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def test_train_end_to_end_loss_falls_and_checkpoint_roundtrips(tmp_path, capsys):
    out = run_train(tmp_path, "--max-steps", "60", "--eval-every", "30")
    rows = read_log(out)
    train_rows = [r for r in rows if "val_loss" not in r]
    evals = [r for r in rows if "val_loss" in r]
    assert len(train_rows) == 60 and [r["step"] for r in evals] == [30, 60]
    first, last = sum(r["loss"] for r in train_rows[:5]) / 5, sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    printed = capsys.readouterr().out
    assert "summary | mpnet" in printed and "fill-in samples" in printed
    # the checkpoint loads safely and rebuilds the same model
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 60 and not any(k.startswith("_orig_mod") for k in ckpt["model"])
    model = MPNext(MPNextConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tok = data.Tokenizer.load(out / "tokenizer.json")
    assert model.cfg.vocab_size == tok.vocab_size and model.cfg.mask_id == tok.mask_id


@pytest.mark.parametrize("opt,heads", [("adamw", ()), ("ranger", ()), ("ranger21", ()),
                                       ("adamw", ("--rtd", "--masking", "span", "--sbo"))])
def test_resume_equals_uninterrupted_run(tmp_path, opt, heads):
    straight = run_train(tmp_path, "--max-steps", "8", "--eval-every", "4", "--optimizer", opt, *heads, out="a")
    run_train(tmp_path, "--max-steps", "4", "--schedule-steps", "8", "--eval-every", "4", "--optimizer", opt, *heads,
              out="b")
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a crash after the checkpoint leaves rows past it
        f.write(json.dumps({"step": 5, "loss": 0.0}) + "\n")
    resumed = run_train(tmp_path, "--max-steps", "8", "--resume", out="b")
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert any(k.startswith("generator.") for k in a["model"]) == bool(heads)  # the generator is checkpointed
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise on CPU
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(resumed)]
    assert train.main(["--out-dir", str(resumed), "--max-steps", "8", "--resume"]) == 2  # nothing left to do
    assert train.main(["--out-dir", str(resumed), "--max-steps", "9", "--resume", "--preset", "small"]) == 2


def test_resume_of_a_run_saved_before_masking_existed(tmp_path):
    """Checkpoints from before --masking (they held whole_word) still resume."""
    out = run_train(tmp_path, "--max-steps", "2", "--eval-every", "2", "--masking", "word")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"].pop("masking") == "word"
    ckpt["model_config"]["whole_word"] = True  # the old format
    torch.save(ckpt, out / "ckpt.pt")
    run_train(tmp_path, "--max-steps", "3", "--masking", "word", "--resume")
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["model_config"]["masking"] == "word"


def test_ctrl_c_saves_a_checkpoint_and_resuming_is_exact(tmp_path):
    """SIGINT mid-run: the step finishes, a checkpoint is saved, the exit says how to resume (status 130); resuming
    from it ends bitwise where an uninterrupted run ends."""
    corpus = toy_corpus(tmp_path / "corpus")
    common = ["--data", corpus, *TINY_ARGS, "--schedule-steps", "3000", "--eval-every", "1000", "--samples", "0"]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *common, "--out-dir", str(out),
                             "--max-steps", "3000"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not (out / "log.jsonl").exists() or len(open(out / "log.jsonl").readlines()) < 5:  # mid-training
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
    assert "--resume" in stdout and "stopped at step" in stdout
    k = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 5 <= k < 3000
    end = str(k + 5)
    assert train.main(["--out-dir", str(out), "--max-steps", end, "--resume"]) == 0
    assert train.main([*common, "--out-dir", str(tmp_path / "straight"), "--max-steps", end]) == 0
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("stopped", "straight"))
    assert a["step"] == b["step"] == k + 5
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])


def torchrun(tmp_path, n_proc, *args):
    """train.py under torchrun on CPU (Gloo): n_proc processes on this machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun leaves folders in the temp dir
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_proc}",
           os.path.join(HERE, "train.py"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch build has no Gloo")
@pytest.mark.parametrize("recipe, accum", [([], 1), (["--objective", "mlm", "--rtd"], 2)])
def test_torchrun_two_processes_train_like_one_with_the_same_global_batch(tmp_path, capsys, recipe, accum):
    """2 processes x --grad-accum A draw the batches of 1 process x --grad-accum 2A (stream s = rank * A + a), so the
    loss curves agree up to float summation order; only rank 0 logs and saves; a 2-process run resumes with 2
    processes; ELECTRA (parameters outside the loss) works with gradient accumulation."""
    common = ["--data", toy_corpus(tmp_path / "corpus"), *TINY_ARGS, "--dtype", "float32", "--schedule-steps", "10",
              "--eval-every", "6", "--samples", "0", *recipe]
    assert train.main([*common, "--out-dir", str(tmp_path / "one"), "--max-steps", "10",
                       "--grad-accum", str(2 * accum)]) == 0
    two = ["--out-dir", str(tmp_path / "two"), "--grad-accum", str(accum)]
    out = torchrun(tmp_path, 2, *common, *two, "--max-steps", "6")
    assert out.count("MPNext ") == 1 and "stopped" not in out  # one voice: rank 0's
    assert [r["step"] for r in read_log(tmp_path / "two") if "val_loss" not in r] == list(range(1, 7))
    assert "holds step" not in torchrun(tmp_path, 2, *common, *two, "--max-steps", "10", "--resume")
    one, two = ([r["loss"] for r in read_log(tmp_path / d) if "val_loss" not in r] for d in ("one", "two"))
    assert len(one) == len(two) == 10 and max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert a["step"] == b["step"] == 10 and len(b["rng"]["batches"]) == 2 * accum
    assert all(torch.allclose(a["model"][n], b["model"][n], atol=1e-4) for n in a["model"])
    # the same streams in one process: a 2-process checkpoint resumes there with --grad-accum 2A, and nowhere else
    more = [*common, "--out-dir", str(tmp_path / "two"), "--max-steps", "11", "--schedule-steps", "11", "--resume"]
    assert train.main(more) == 2 and "batch stream" in capsys.readouterr().err
    assert train.main([*more, "--grad-accum", str(2 * accum)]) == 0


def nan_losses_at(monkeypatch, bad_calls):
    """Make the training loss NaN on the given training calls (1-based); evaluation is left alone."""
    real, calls = MPNext.loss, [0]

    def loss(self, batch):
        value, metrics = real(self, batch)
        if self.training:
            calls[0] += 1
            if calls[0] in bad_calls:
                value = value * float("nan")
        return value, metrics

    monkeypatch.setattr(MPNext, "loss", loss)


def test_a_nan_loss_is_skipped(tmp_path, monkeypatch, capsys):
    nan_losses_at(monkeypatch, {3})
    out = run_train(tmp_path, "--max-steps", "8", "--eval-every", "4")
    assert "update skipped (1 in a row" in capsys.readouterr().out
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 8 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_save_every_and_an_all_warmup_warning(tmp_path, monkeypatch, capsys):
    nan_losses_at(monkeypatch, set(range(6, 100)))  # the run stops at step 10; only --save-every saved before that
    argv = ["--data", toy_corpus(tmp_path / "corpus"), "--out-dir", str(tmp_path / "out"), *TINY_ARGS,
            "--max-steps", "40", "--eval-every", "100", "--save-every", "2", "--warmup-steps", "50"]
    assert train.main(argv) == 1
    assert "covers the whole learning-rate plan" in capsys.readouterr().err
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 4  # 6, 8, 10 followed NaN steps


@pytest.mark.parametrize("poison", [False, True])
def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, poison):
    """NaN losses from step 6 on: updates are skipped (the weights stay good: step 8 is saved) and the run stops after
    5 in a row. With a NaN weight (poison), validation is NaN too and step 8 must not overwrite step 4's checkpoint."""
    if poison:
        real = MPNext.loss

        def loss(self, batch):
            if self.training and not hasattr(self, "poisoned") and (tmp_path / "out" / "log.jsonl").exists() \
                    and len(open(tmp_path / "out" / "log.jsonl").readlines()) >= 6:  # 5 steps + the step-4 eval
                self.poisoned = True
                with torch.no_grad():
                    self.head_bias.fill_(float("nan"))
            return real(self, batch)

        monkeypatch.setattr(MPNext, "loss", loss)
    else:
        nan_losses_at(monkeypatch, set(range(6, 100)))
    argv = ["--data", toy_corpus(tmp_path / "corpus"), "--out-dir", str(tmp_path / "out"), *TINY_ARGS,
            "--max-steps", "40", "--eval-every", "4"]
    assert train.main(argv) == 1
    assert "not finite for 5 steps in a row (up to step 10)" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == (4 if poison else 8) and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_auto_dtype_is_bf16_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.pick_dtype("auto", "cpu") == torch.bfloat16 and train.pick_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert train.pick_dtype("auto", "cpu") == torch.float32 and train.pick_dtype("auto", "cuda") == torch.float16
    assert train.pick_dtype("float32", "cpu") == torch.float32  # the opt-out


@pytest.mark.parametrize("preset,width", [("tiny", 128), ("base", 768)])
def test_help_shows_the_defaults_of_the_preset_in_use(preset, width, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", preset, "--help"] if preset != "tiny" else ["--help"])
    assert f"hidden size D (default: {width})" in capsys.readouterr().out


def cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, na\xefve".encode("latin-1") * 50)
    (tmp_path / "short.txt").write_text("just a few words of text here\n\nand a second paragraph")
    cases = [(["--data", "missing.txt"], "missing.txt"), (["--data", "empty.txt"], "empty.txt"),
             (["--data", "latin1.txt"], "UTF-8"), (["--data", "short.txt", "--vocab", "300"], "less than one block"),
             (["--preset", "enormous"], "invalid choice"), (["--resume", "--out-dir", "nowhere"], "ckpt.pt"),
             (["--resume", "--out-dir", "junk"], "not an MPNext checkpoint"), (["--grad-accum", "0"], "--grad-accum"),
             (["--n-head", "3"], "multiple of n_head"),
             (["--objective", "mlm", "--rtd", "--sbo"], "leak the span"), (["--masking", "spans"], "invalid choice"),
             (["--max-steps", "0"], "--max-steps"), (["--lr=-1e-3"], "--lr"), (["--lr", "nan"], "--lr"),
             (["--pred-ratio", "1.5"], "pred_ratio"), (["--out-dir", "empty.txt"], "is a file"),
             (["--out-dir", "junk"], "already holds a run"), (["--out-dir", "/proc/nowhere"], "cannot create"),
             (["--lr", "-1e-3"], "--lr -0.001"), (["--max-steps", "200", "--schedule-steps", "100"], "past --schedule"),
             (["--save-every", "-1"], "--save-every"), (["--vocab", "-10"], "--vocab"), (["--vocab", "100"], "at least 261")]
    os.makedirs(tmp_path / "junk")
    (tmp_path / "junk" / "ckpt.pt").write_bytes(b"not a checkpoint")
    monkeypatch.chdir(tmp_path)
    for k, (args, needle) in enumerate(cases):
        if k % 8 == 0:  # a few through the real command line (no traceback reaches the user) ...
            r = cli(*args, cwd=tmp_path)
            status, err = r.returncode, r.stderr
        else:  # ... the rest in this process, in milliseconds
            try:
                status = train.main(args)
            except SystemExit as e:  # argparse's own errors
                status = e.code
            err = capsys.readouterr().err
        assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
        assert needle in err, (args, err)


def test_values_out_of_range_and_clashing_outputs_are_one_line_before_any_work(tmp_path, capsys):
    """Pre-training checks its numbers and its output directory first (in-process: each case fails in
    milliseconds, before any data is read)."""
    os.makedirs(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{}")  # an exported HF checkpoint
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")  # another run
    (tmp_path / "file").write_text("x")
    out = ["--out-dir", str(tmp_path / "new")]
    cases = [(["--grad-clip", "-1", *out], "--grad-clip"), (["--weight-decay", "-1", *out], "--weight-decay"),
             (["--beta1", "1.5", *out], "--beta1"), (["--eps", "0", *out], "--eps"),
             (["--min-lr-ratio", "2", *out], "--min-lr-ratio"), (["--warmup-steps", "-1", *out], "--warmup-steps"),
             (["--samples", "-1", *out], "--samples"), (["--n-layer", "0", *out], "n_layer"),
             (["--dropout", "1.5", *out], "dropout"), (["--rel-max-distance", "8", *out], "rel_max_distance"),
             (["--rtd", "--rtd-weight", "-1", *out], "rtd_weight"),
             (["--out-dir", str(tmp_path / "hf")], "Hugging Face checkpoint"),
             (["--export-hf", str(tmp_path / "run"), *out], "holding an MPNext run")]
    for args, needle in cases:
        assert train.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "new").exists()


def load_run(out):
    """The model and tokenizer of a run directory (the lab's lab.use.load_run does the same for users)."""
    ckpt = data.read_run(str(out))
    model = MPNext(MPNextConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), data.load_tokenizer(str(out))


def make_hf_mpnet(path):
    """A Hugging Face MPNet with random weights and a small WordPiece vocabulary, saved locally (no download)."""
    transformers = pytest.importorskip("transformers")
    words = ("the cat dog bird fish horse king queen child river tree house ship garden sees finds likes follows "
             "paints feeds carries watches builds hears old young red green small large quiet happy dark bright "
             "sail farm . ,").split()
    vocab = ["<s>", "<pad>", "</s>", "[UNK]"] + words + ["##or", "##er", "##s", "##ed"] + ["<mask>"]
    os.makedirs(path, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.MPNetTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.MPNetConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=66)
    transformers.MPNetForMaskedLM(cfg).save_pretrained(path)
    return str(path)


def test_init_from_hf_mpnet_continue_pretraining_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = make_hf_mpnet(tmp_path / "hf-mpnet")
    tok = data.HFTokenizer(hf_dir)
    ids = tok.encode("the sailor farmer sees")
    pieces = tok.hf.convert_ids_to_tokens(ids)
    assert pieces == ["the", "sail", "##or", "farm", "##er", "sees"]
    assert tok.word_start[ids].tolist() == [True, True, False, True, False, True]
    corpus = toy_corpus(tmp_path / "corpus")
    argv = ["--init", hf_dir, "--data", corpus, "--out-dir", str(tmp_path / "run"), "--masking", "word",
            "--max-steps", "3", "--eval-every", "3", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1",
            "--samples", "1", "--warmup-steps", "1", "--export-hf", str(tmp_path / "exported")]
    assert train.main(argv) == 0
    model, tok2 = load_run(str(tmp_path / "run"))
    assert isinstance(tok2, data.HFTokenizer) and model.cfg.masking == "word" and model.cfg.d_model == 32
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "exported").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    x = hf_tok(["the old cat sees the <mask> dog ."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-5)
        assert not torch.allclose(hf(x).logits, transformers.MPNetForMaskedLM.from_pretrained(hf_dir)(x).logits)
    answers = transformers.pipeline("fill-mask", model=str(tmp_path / "exported"))("the old cat sees the <mask> .")
    assert len(answers) == 5
    # size flags that contradict the checkpoint: one line, status 2
    assert train.main(argv[:6] + ["--out-dir", str(tmp_path / "r2"), "--d-model", "64"]) == 2


def test_init_from_an_mpnext_run_takes_weights_and_tokenizer_with_a_fresh_optimizer(tmp_path):
    first = run_train(tmp_path, "--max-steps", "4")
    before = torch.load(first / "ckpt.pt", weights_only=True)["model"]
    argv = ["--init", str(first), "--data", str(tmp_path / "corpus"), "--out-dir", str(tmp_path / "second"),
            "--objective", "mlm", "--rtd", "--batch-size", "8", "--seq-len", "32", "--eval-batches", "1",
            "--samples", "0", "--warmup-steps", "1", "--lr", "1e-9"]
    tc, cfg, tok, device, train_b, val_b, ckpt, init_state = train.setup(argv + ["--max-steps", "1"])
    assert ckpt is None and torch.equal(init_state["blocks.1.fc1.weight"], before["blocks.1.fc1.weight"])
    assert tok.merges == data.Tokenizer.load(first / "tokenizer.json").merges and cfg.objective == "mlm" and cfg.rtd
    model = train.train(tc, cfg, tok, device, train_b, val_b, ckpt, init_state)[0]
    assert (model.state_dict()["blocks.1.fc1.weight"] - before["blocks.1.fc1.weight"]).abs().max() < 1e-6
    assert train.main(argv + ["--out-dir", str(tmp_path / "third"), "--vocab", "500"]) == 2  # the vocab is the run's


def test_the_core_imports_nothing_of_the_lab_and_no_two_files_import_each_other():
    """Imports flow one way: lab -> train -> data -> mpnext, and mpnext needs only the standard library, torch and
    numpy."""
    def imported(name):
        tree = ast.parse(open(os.path.join(HERE, name + ".py")).read())
        return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
            n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    core = {"mpnext", "data", "train", "lab"}
    assert {m: imported(m) & core for m in ("mpnext", "data", "train")} == {
        "mpnext": set(), "data": {"mpnext"}, "train": {"data", "mpnext"}}
    top_level = ast.parse(open(os.path.join(HERE, "mpnext.py")).read()).body  # (from_hf / to_hf import transformers
    mods = {a.name for n in top_level if isinstance(n, ast.Import) for a in n.names}  # and safetensors where used)
    mods |= {n.module for n in top_level if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in mods} - set(sys.stdlib_module_names) <= {"torch", "numpy"}


# ---------------------------------------------------------------------------------------------------------------------
# train.py and data.py as a new user meets them: every message and every wait

def test_a_mistyped_init_is_refused_at_once_without_the_network(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("out")
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"")  # an output that would clash: the input is judged first
    for bad in ("outt", "./outt", "/no/such/dir"):
        start = time.time()
        assert train.main(["--init", bad]) == 2
        err = capsys.readouterr().err
        assert time.time() - start < 1 and err.count("\n") == 1 and "no such run or checkpoint directory" in err, err


def test_a_hub_name_while_offline_is_one_line_and_quick(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: as offline as it gets
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-cache"))
    start = time.time()
    assert train.main(["--init", "nobody/no-such-model", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert time.time() - start < 10 and err.count("\n") == 1 and "hub is unreachable" in err, err


def test_a_rerun_says_how_to_go_on(tmp_path, capsys):
    out = run_train(tmp_path, "--max-steps", "2", "--eval-every", "2")
    capsys.readouterr()
    assert train.main(["--out-dir", str(out), "--max-steps", "2"]) == 2
    assert "--resume and a larger --max-steps" in capsys.readouterr().err
    assert train.main(["--out-dir", str(out), "--max-steps", "2", "--resume"]) == 2
    assert "at step 2 already; to train further, pass a larger --max-steps" in capsys.readouterr().err


def test_a_directory_says_what_it_skipped_and_too_little_text_is_refused_before_bpe(tmp_path, capsys):
    d = tmp_path / "polarity"
    d.mkdir()
    (d / "README.txt").write_text("Sentence polarity data: 5331 positive and 5331 negative snippets.\n")
    (d / "rt-polarity.pos").write_text("a fine film .\n" * 200)
    (d / "rt-polarity.neg").write_text("a dull film .\n" * 200)
    assert train.main(["--data", str(d), "--out-dir", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert "note:" in out and "README.txt" in out and ".neg .pos" in out
    assert "less than one block" in err and "BPE" not in out  # refused before a tokenizer is trained


def test_ctrl_c_while_the_tokenizer_trains_is_one_line_and_status_130(tmp_path):
    """SIGINT in the BPE phase (made to last: its training sleeps) ends with one line and the shell's 130."""
    corpus = toy_corpus(tmp_path / "corpus")
    code = ("import sys, time, data, train\n"
            "data.Tokenizer.train = classmethod(lambda cls, *a, **k: (print('training', flush=True), time.sleep(60)))\n"
            f"sys.exit(train.main(['--data', {corpus!r}, '--out-dir', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = ""
    while "training" not in line:  # the tokenizer phase has begun
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_no_unasked_output_and_a_progress_line_without_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "PLAIN_EVERY", 0)  # a line at every log step (20 s apart in a real job)
    argv = ["--data", toy_corpus(tmp_path / "corpus"), "--out-dir", str(tmp_path / "o"),
            *[a for a in TINY_ARGS if a not in ("--warmup-steps", "5")], "--max-steps", "3", "--eval-every", "3"]
    assert train.main(argv) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err  # the default warmup (100) covers this 3-step run: nobody asked for it
    assert "step 1/3 | loss=" in out and "step 3/3 | " in out
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for name in ("tokenizer.json", "train_tokens.npz", "val_tokens.npz", "ckpt.pt"):
        assert (tmp_path / "o" / name).stat().st_mode & 0o777 == mode, name


def test_help_is_short_and_names_the_lab(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python train.py [flags]") and "python -m lab --help" in out
    assert "(default: )" not in out and "Sec. 3" not in out and "{tiny,small,medium,base}" in out
    with pytest.raises(SystemExit):
        train.parse_args(["fine-tune"])
    assert "python -m lab --help" in capsys.readouterr().err
