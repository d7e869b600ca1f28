"""
MPNext: MPNet (masked and permuted pre-training) in one readable file, plus the ideas of its time to combine with it.

    MPNet: Masked and Permuted Pre-training for Language Understanding
    Song, Tan, Qin, Lu, Liu -- arXiv 2004.09297 (NeurIPS 2020)

The objective in one breath (paper Sec. 2.2): sample a permutation z of the N positions of a sentence; the last
P = round(pred_ratio * N) entries of z are "predicted", the first C = N - P are "non-predicted". Predict them one by
one in permuted order, like XLNet's permuted LM (PLM, arXiv 1906.08237), so later predictions depend on earlier ones,
and also feed P [MASK] symbols that carry the *positions* of all predicted tokens ("position compensation"), so every
prediction sees where the whole sentence is, as BERT's MLM does:

    L_MPNet = - sum_{t=C+1..N} log P(x_{z_t} | x_{z_<t}, M_{z_>C})                                     # Eq. (5)

Reading guide (small pieces first, the model last):
    1. config ............. MPNextConfig and its presets
    2. activations ........ GELU (erf), Mish (arXiv 1908.08681)
    3. positions .......... T5-style bucketed relative position bias (arXiv 1910.10683 Sec. 2.1), as MPNet uses it
    4. two-stream masks ... content / query masks of MPNet and of PLM, and a text renderer for them
    5. the model .......... attention, block, MPNext (natural-order encoder + two-stream encoder + tied LM head)
    6. input builders ..... permutation (token or whole word), 80/10/10 corruption, MLM / PLM / MPNet batches, the loss
    7. Hugging Face ....... MPNext.from_hf / to_hf, logits identical to transformers' MPNetForMaskedLM
    8. schedules .......... warmup + linear / cosine decay

Shapes: B batch, N tokens of a sentence, P predicted tokens, C = N - P, T rows fed to the encoder,
H heads, hs head size, D = d_model, V vocabulary.
"""

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class MPNextConfig:
    # -- size (MPNet-base numbers in the `base` preset)
    vocab_size: int = 8192  # tokens in the vocabulary (train.py sets it from the tokenizer)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    d_model: int = 256  # hidden size D
    d_ff: int = 1024  # inner size of the feed-forward network
    max_len: int = 128  # longest sequence; the position table has max_len + 2 rows (fairseq's offset, Sec. 3 below)
    # -- architecture knobs
    activation: str = "gelu"  # "gelu" (MPNet, erf form) or "mish" (arXiv 1908.08681), used in the FFN and the LM head
    pre_ln: bool = False  # False = post-LN blocks as in MPNet/BERT; True = pre-LN blocks plus a final LayerNorm
    dropout: float = 0.1  # dropout on embeddings, attention output and FFN output
    attn_dropout: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-5  # fairseq's default; HF's MPNetConfig class default (1e-12) is NOT what MPNet used
    rel_buckets: int = 32  # relative position buckets, half for keys on the left, half for keys on the right
    rel_max_distance: int = 128  # distances beyond this share the last bucket
    # -- token ids the model and the input builders must know
    pad_id: int = 0  # padding: never predicted, masked out of attention, gets position row 1 (fairseq's padding_idx)
    mask_id: int = 3  # the [MASK] symbol fed to predicted positions
    special_ids: tuple = (0, 1, 2, 3)  # never predicted, never drawn as random replacements (pad and mask included)
    # -- pre-training objective (Sec. 2 of the paper; `mlm` and `plm` are its ablations, Table 5)
    objective: str = "mpnet"  # "mpnet" (PLM + position compensation), "plm" (XLNet-style), "mlm" (BERT-style)
    pred_ratio: float = 0.15  # fraction of the N tokens that is predicted: P = round(pred_ratio * N)
    mask_prob: float = 0.8  # of the predicted tokens: fed as [MASK] ...
    random_prob: float = 0.1  # ... fed as a random non-special token; the rest (0.1) keep the original token
    whole_word: bool = False  # permute whole words (word-start flags from the data) instead of single tokens
    return_mlm: bool = False  # MPNet's --return-mlm: add an MLM loss on the mask-copy rows of the content stream

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # trains in minutes on 2 CPU cores: ~3M parameters besides the embeddings
    "tiny": dict(n_layer=4, n_head=4, d_model=128, d_ff=512, max_len=128),
    "small": dict(n_layer=6, n_head=8, d_model=256, d_ff=1024, max_len=256),
    "medium": dict(n_layer=8, n_head=8, d_model=512, d_ff=2048, max_len=512),
    # MPNet-base exactly (hub config microsoft/mpnet-base): fairseq dictionary ids <s>=0 <pad>=1 </s>=2 <unk>=3,
    # <mask> appended last = 30526
    "base": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, max_len=512, vocab_size=30527,
                 pad_id=1, mask_id=30526, special_ids=(0, 1, 2, 3, 30526)),
}

# ----------------------------------------------------------------------------------------------------------------------
# 2. Activations


def mish(x):
    """Mish (Misra, arXiv 1908.08681): mish(x) = x * tanh(softplus(x)), softplus(x) = ln(1 + e^x).
    F.softplus switches to the identity for x > 20, which keeps gradients finite where ln(1 + e^x) would overflow."""
    return x * torch.tanh(F.softplus(x))  # Eq. (1) of the Mish paper


ACTIVATIONS = {"gelu": F.gelu, "mish": mish}  # F.gelu is the exact erf form, as fairseq and HF MPNet use

# ----------------------------------------------------------------------------------------------------------------------
# 3. Relative position bias (MPNet uses T5's bucketed scalar bias, arXiv 1910.10683 Sec. 2.1)
#
# One table of `rel_buckets x n_head` scalars, computed once per forward and added to the attention logits of every
# layer. The distance is taken between ORIGINAL positions, so a permuted sequence sees the same bias as the sentence in
# natural order: that is what lets the two-stream encoder move tokens around freely (spec mpnet.md Sec. 2.2).


def relative_bucket(q_pos, k_pos, n_buckets=32, max_distance=128):
    """Bucket of key position k seen from query position q. n = q - k; keys on the right (n < 0) use the upper half.
    Within a half: distances 0..7 exact, then log-spaced up to max_distance, beyond it the last bucket.
    Example with 32 buckets: n = 0 -> 0, n = 3 -> 3, n = -3 -> 19, n = 20 -> 10, n = 500 -> 15."""
    n = q_pos[..., :, None] - k_pos[..., None, :]  # (..., Tq, Tk)
    half = n_buckets // 2
    bucket = (n < 0).long() * half  # keys to the right of the query get buckets half..n_buckets-1
    n = n.abs()
    exact = half // 2
    # same float32 arithmetic as fairseq/HF so every bucket boundary agrees with released checkpoints
    log_bucket = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return bucket + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


# ----------------------------------------------------------------------------------------------------------------------
# 4. Two-stream attention masks (paper Sec. 2.2 and Fig. 2; the fairseq function make_query_and_content_mask)
#
# MPNet feeds T = N + 2P rows:   [ x_z1 .. x_zC | x_zC+1 .. x_zN | m_1 .. m_P | m_1 .. m_P ]
#                                  non-predicted   predicted p_k    mask copies  query rows
# The first N + P rows are the content stream, the last P the query stream. Keys and values come from the content
# stream only. What each row may see (k, j index the predicted block in permuted order):
#
#     row                  non-predicted   predicted p_j    mask copies m_j     keys seen
#     query k              all             j < k            j >= k              N
#     content p_k          all             j <= k           j > k               N
#     content non-pred.    all             none             all                 N
#     content m_k          all             none             all                 N
#
# Every row sees exactly one token per original position: N keys, the length of the sentence, as in fine-tuning.
# Query k sees the content of p_<k (the autoregressive dependency of PLM) and the mask copies of p_>=k (position
# compensation). Non-predicted and mask-copy rows must never see predicted content, else p_k reaches query k in two hops.
#
# PLM (XLNet-style, no position compensation) drops the mask copies: T = N + P rows [ content N | query P ];
# query k sees non-predicted + p_<k (C + k - 1 keys), p_k sees non-predicted + p_<=k, non-predicted rows see themselves.


@lru_cache(maxsize=64)
def two_stream_mask(n, p, kind="mpnet"):
    """Allowed-attention table (True = may attend) for the rows [content | query] over the content columns.
    Shape (N + 2P, N + P) for "mpnet", (N + P, N) for "plm". Cached: it depends only on (N, P, kind)."""
    c = n - p
    strict = torch.ones(p, p, dtype=torch.bool).tril(-1)  # j < k
    upto = torch.ones(p, p, dtype=torch.bool).tril(0)  # j <= k
    if kind == "plm":
        allowed = torch.zeros(n + p, n, dtype=torch.bool)
        allowed[:, :c] = True  # everyone sees the non-predicted tokens
        allowed[c:n, c:] = upto  # content p_k sees p_<=k
        allowed[n:, c:] = strict  # query k sees p_<k
        return allowed
    if kind != "mpnet":
        raise ValueError(f"unknown two-stream kind {kind!r}; use 'mpnet' or 'plm'")
    allowed = torch.zeros(n + 2 * p, n + p, dtype=torch.bool)
    allowed[:, :c] = True
    allowed[:c, n:] = True  # non-predicted rows see all mask copies
    allowed[c:n, c:n] = upto  # content p_k: predicted j <= k ...
    allowed[c:n, n:] = ~upto  # ... and mask copies j > k
    allowed[n:n + p, n:] = True  # mask-copy rows see all mask copies
    allowed[n + p:, c:n] = strict  # query k: predicted j < k ...
    allowed[n + p:, n:] = ~strict  # ... and mask copies j >= k
    return allowed


def render_masks(n, p, kind="mpnet"):
    """The mask of `two_stream_mask` as text ('#' = attends, '.' = blocked), one labelled line per row."""
    c = n - p
    cols = [f"x{i + 1}" for i in range(n)] + ([f"m{c + j + 1}" for j in range(p)] if kind == "mpnet" else [])
    rows = cols + [f"q{c + j + 1}" for j in range(p)]
    allowed = two_stream_mask(n, p, kind)
    width = max(len(s) for s in rows) + 1
    lines = [" " * width + " ".join(s[-2:].rjust(2) for s in cols)]
    for name, row in zip(rows, allowed.tolist()):
        lines.append(name.ljust(width) + " ".join(" #" if a else " ." for a in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# 5. The model: attention, block, MPNext
#
# One attention call serves both streams: queries are all T rows (content + query stream), keys and values are the
# first `n_kv` rows (the content stream). The block mask of Sec. 4 and the relative bias are folded into one additive
# mask computed once per forward. In the natural-order path n_kv = T and the mask is the bias plus key padding.


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be a multiple of n_head"
        self.n_head, self.d_model, self.attn_dropout = cfg.n_head, cfg.d_model, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows [W_q; W_k; W_v], shared by both streams
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, attn_bias, n_kv):
        B, T, D = x.shape
        H, hs = self.n_head, D // self.n_head
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x, w[:D], b[:D])  # (B, T, D): queries of content AND query stream
        kv = F.linear(x[:, :n_kv], w[D:], b[D:])  # (B, n_kv, 2D): keys/values from the content stream only
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        k, v = kv.view(B, n_kv, 2, H, hs).permute(2, 0, 3, 1, 4)  # 2 x (B, H, n_kv, hs)
        # softmax(q k^T / sqrt(hs) + bias + mask) v                                            # Vaswani et al. Eq. (1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    """Transformer layer. Post-LN (MPNet, BERT): x = LN(x + f(x)). Pre-LN: x = x + f(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.pre_ln, self.act = cfg.pre_ln, ACTIVATIONS[cfg.activation]
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def ffn(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))

    def forward(self, x, attn_bias, n_kv):
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), attn_bias, n_kv))
            return x + self.ffn(self.ln2(x))
        x = self.ln1(x + self.drop(self.attn(x, attn_bias, n_kv)))
        return self.ln2(x + self.ffn(x))


class MPNext(nn.Module):
    """MPNet encoder with a tied LM head. Two ways in:
    - forward(input_ids, attention_mask) -> logits (B, T, V): ordinary bidirectional encoder in natural order
      (fine-tuning, plain MLM, and exactly HF's MPNetForMaskedLM).
    - two_stream(input_ids, positions, n_pred, kind) -> logits (B, P, V): the pre-training layout of Sec. 4."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {cfg.activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
        self.cfg = cfg
        D = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        # fairseq's learned positions: row 1 is the padding row, real position i uses row i + 2 (row 0 unused)
        self.pos_emb = nn.Embedding(cfg.max_len + 2, D)
        self.emb_ln = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # MPNet normalises the embeddings (post-LN setup)
        self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)  # shared by all layers
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.pre_ln else nn.Identity()
        # LM head (RoBERTa/MPNet): dense -> activation -> LayerNorm -> decoder tied to tok_emb, plus its own bias
        self.head_dense = nn.Linear(D, D)
        self.head_ln = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.apply(self._init_weights)

        with torch.no_grad():  # fairseq zeroes the padding rows
            self.tok_emb.weight[cfg.pad_id].zero_()
            self.pos_emb.weight[1].zero_()

    @staticmethod
    def _init_weights(m):
        # BERT/fairseq init_bert_params: N(0, 0.02) for weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -- pieces shared by both paths

    def embed(self, input_ids, positions):
        """Token + absolute position embeddings of ORIGINAL positions (0-based), LayerNorm, dropout."""
        rows = torch.where(input_ids == self.cfg.pad_id, 1, positions + 2)  # fairseq offset; pads use row 1
        return self.drop(self.emb_ln(self.tok_emb(input_ids) + self.pos_emb(rows)))

    def attention_bias(self, q_pos, k_pos, allowed, dtype):
        """Relative bias (.., H, Tq, Tk) with blocked entries set to the dtype's minimum (finite: a fully blocked
        row then gives a uniform softmax instead of NaN)."""
        buckets = relative_bucket(q_pos, k_pos, self.cfg.rel_buckets, self.cfg.rel_max_distance)
        bias = self.rel_bias(buckets).to(dtype)  # (B or 1, Tq, Tk, H)
        bias = bias.permute(0, 3, 1, 2)  # (B or 1, H, Tq, Tk)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)

    def run_blocks(self, x, attn_bias, n_kv):
        for block in self.blocks:
            x = block(x, attn_bias, n_kv)
        return self.ln_f(x)

    def lm_head(self, h):
        h = self.head_ln(ACTIVATIONS[self.cfg.activation](self.head_dense(h)))
        return F.linear(h, self.tok_emb.weight, self.head_bias)  # (.., V)

    def _check_length(self, n):
        if n > self.cfg.max_len:  # a shape check, not a data check: no GPU sync, no torch.compile graph break
            raise ValueError(f"a sequence of {n} tokens exceeds max_len={self.cfg.max_len} of this model")

    def _compute_dtype(self, x):
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    # -- natural order (fine-tuning, MLM)

    def encode(self, input_ids, attention_mask=None):
        """Hidden states (B, T, D). Positions follow HF/fairseq: the i-th non-pad token has position i, pads none;
        the relative bias uses arange(T) as HF does. attention_mask (B, T): 1 = token, 0 = padding (key masked)."""
        B, T = input_ids.shape
        self._check_length(T)
        not_pad = (input_ids != self.cfg.pad_id).long()
        positions = (not_pad.cumsum(1) - 1).clamp(min=0)  # (B, T)
        x = self.embed(input_ids, positions)
        allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): mask padded keys
        ar = torch.arange(T, device=x.device)[None]
        bias = self.attention_bias(ar, ar, allowed, self._compute_dtype(x))
        return self.run_blocks(x, bias, T)

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.encode(input_ids, attention_mask))  # (B, T, V)

    # -- two streams (pre-training)

    def two_stream_encode(self, input_ids, positions, n_pred, kind="mpnet"):
        """input_ids, positions: (B, T) with T = N + 2P ("mpnet": [N permuted tokens | P mask copies | P query rows])
        or T = N + P ("plm": [N permuted tokens | P query rows]); positions are the ORIGINAL 0-based positions.
        Returns hidden states (B, T, D) of every row; the last P rows are the query stream."""
        B, T = input_ids.shape
        n = T - 2 * n_pred if kind == "mpnet" else T - n_pred  # sentence length N
        n_kv = T - n_pred  # content stream rows = keys/values
        self._check_length(n)
        x = self.embed(input_ids, positions)
        allowed = two_stream_mask(n, n_pred, kind).to(x.device)[None, None]  # (1, 1, T, n_kv)
        key_pad = input_ids[:, :n_kv] == self.cfg.pad_id  # padding is never a key
        allowed = allowed & ~key_pad[:, None, None, :]  # (B, 1, T, n_kv)
        bias = self.attention_bias(positions, positions[:, :n_kv], allowed, self._compute_dtype(x))
        return self.run_blocks(x, bias, n_kv)

    def two_stream(self, input_ids, positions, n_pred, kind="mpnet"):
        h = self.two_stream_encode(input_ids, positions, n_pred, kind)
        return self.lm_head(h[:, -n_pred:])  # (B, P, V): the LM head runs on the query rows only

    # -- the pre-training loss

    def loss(self, batch):
        """Mean cross-entropy over the predicted tokens of a batch from `make_batch` (Sec. 6), and the masked-token
        accuracy. For "mpnet" with return_mlm, the mask-copy rows (which see exactly BERT's MLM context) add an MLM
        loss at almost no cost (MPNet's --return-mlm)."""
        kind, targets, P = batch["kind"], batch["targets"], batch["targets"].shape[1]
        extra = None
        if kind == "mlm":
            h = self.encode(batch["input_ids"], batch.get("attention_mask"))
            idx = batch["pred_positions"][..., None].expand(-1, -1, h.size(-1))  # (B, P, D)
            logits = self.lm_head(h.gather(1, idx))  # sparse prediction: the head runs on the P rows only
        else:
            h = self.two_stream_encode(batch["input_ids"], batch["positions"], P, kind)
            logits = self.lm_head(h[:, -P:])  # (B, P, V)
            if kind == "mpnet" and self.cfg.return_mlm:
                extra = self.lm_head(h[:, -2 * P:-P])  # mask-copy rows of the content stream
        logits = logits.float()  # loss in fp32, as fairseq does
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        metrics = {"loss": loss.detach(), "acc": (logits.argmax(-1) == targets).float().mean()}
        if extra is not None:
            mlm_loss = F.cross_entropy(extra.float().flatten(0, 1), targets.flatten())
            metrics["mlm_loss"] = mlm_loss.detach()
            loss = loss + mlm_loss
        return loss, metrics

    # -- Hugging Face interop (Sec. 7)

    @classmethod
    def from_hf(cls, model_or_path, **overrides):
        """Load an HF MPNetForMaskedLM / MPNetModel (object, local directory or hub name). `transformers` is imported
        only here. An MPNetModel has no LM head: the head keeps its fresh init. mask_id defaults to the last id
        (fairseq appends <mask> to the dictionary, e.g. 30526 in microsoft/mpnet-base); override it if yours differs."""
        from transformers import MPNetForMaskedLM
        hf = MPNetForMaskedLM.from_pretrained(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) \
            else model_or_path
        hc = hf.config
        if hc.hidden_act not in ACTIVATIONS:
            raise ValueError(f"MPNet checkpoint uses activation {hc.hidden_act!r}; MPNext supports {list(ACTIVATIONS)}")
        mask_id = overrides.pop("mask_id", hc.vocab_size - 1)
        specials = tuple(sorted({i for i in (hc.bos_token_id, hc.pad_token_id, hc.eos_token_id, 3, mask_id)
                                 if i is not None}))
        cfg = MPNextConfig(**{**dict(
            vocab_size=hc.vocab_size, n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads,
            d_model=hc.hidden_size, d_ff=hc.intermediate_size, max_len=hc.max_position_embeddings - 2,
            activation=hc.hidden_act, dropout=hc.hidden_dropout_prob, attn_dropout=hc.attention_probs_dropout_prob,
            layer_norm_eps=hc.layer_norm_eps, rel_buckets=hc.relative_attention_num_buckets,
            pad_id=hc.pad_token_id, mask_id=mask_id, special_ids=specials), **overrides})
        model = cls(cfg)
        sd = hf.state_dict()
        base = "mpnet." if any(k.startswith("mpnet.") for k in sd) else ""
        ours = {}
        for hf_key, our_key in _hf_names(cfg.n_layer).items():
            if hf_key.startswith("lm_head.") and "lm_head.dense.weight" not in sd:
                continue  # MPNetModel: no head to load
            if hf_key.startswith("mpnet."):
                hf_key = base + hf_key[len("mpnet."):]
            ours[our_key] = sd[hf_key]
        for i in range(cfg.n_layer):  # HF keeps q, k, v apart; we fuse them
            a = f"{base}encoder.layer.{i}.attention.attn."
            for t in ("weight", "bias"):
                ours[f"blocks.{i}.attn.qkv.{t}"] = torch.cat([sd[a + f"q.{t}"], sd[a + f"k.{t}"], sd[a + f"v.{t}"]])
        missing, unexpected = model.load_state_dict(ours, strict=False)
        assert not unexpected and all(k.startswith("head_") for k in missing), (missing, unexpected)
        return model

    def to_hf(self, out_dir):
        """Write an HF MPNetForMaskedLM checkpoint (config.json + pytorch_model.bin) without needing `transformers`;
        `MPNetForMaskedLM.from_pretrained(out_dir)` gives the same logits."""
        cfg = self.cfg
        if cfg.pre_ln or cfg.activation != "gelu":
            raise ValueError("HF MPNet only has post-LN blocks and a GELU LM head: pre_ln/mish models cannot be exported")
        sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        out = {hf_key: sd[our_key] for hf_key, our_key in _hf_names(cfg.n_layer).items()}
        out["lm_head.decoder.weight"] = sd["tok_emb.weight"]
        out["lm_head.decoder.bias"] = sd["head_bias"]
        for i in range(cfg.n_layer):
            qw, kw, vw = sd[f"blocks.{i}.attn.qkv.weight"].chunk(3)
            qb, kb, vb = sd[f"blocks.{i}.attn.qkv.bias"].chunk(3)
            a = f"mpnet.encoder.layer.{i}.attention.attn."
            out.update({a + "q.weight": qw, a + "k.weight": kw, a + "v.weight": vw,
                        a + "q.bias": qb, a + "k.bias": kb, a + "v.bias": vb})
        hf_config = dict(
            architectures=["MPNetForMaskedLM"], model_type="mpnet", vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
            intermediate_size=cfg.d_ff, hidden_act="gelu", hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.attn_dropout, max_position_embeddings=cfg.max_len + 2,
            initializer_range=0.02, layer_norm_eps=cfg.layer_norm_eps,
            relative_attention_num_buckets=cfg.rel_buckets, pad_token_id=cfg.pad_id, tie_word_embeddings=True)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        torch.save({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, "pytorch_model.bin"))


def _hf_names(n_layer):
    """HF MPNetForMaskedLM parameter name -> MPNext parameter name (q/k/v are fused separately)."""
    names = {
        "mpnet.embeddings.word_embeddings.weight": "tok_emb.weight",
        "mpnet.embeddings.position_embeddings.weight": "pos_emb.weight",
        "mpnet.embeddings.LayerNorm.weight": "emb_ln.weight", "mpnet.embeddings.LayerNorm.bias": "emb_ln.bias",
        "mpnet.encoder.relative_attention_bias.weight": "rel_bias.weight",
        "lm_head.dense.weight": "head_dense.weight", "lm_head.dense.bias": "head_dense.bias",
        "lm_head.layer_norm.weight": "head_ln.weight", "lm_head.layer_norm.bias": "head_ln.bias",
        "lm_head.bias": "head_bias",
    }
    for i in range(n_layer):
        h, o = f"mpnet.encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            names.update({h + f"attention.attn.o.{t}": o + f"attn.proj.{t}", h + f"attention.LayerNorm.{t}": o + f"ln1.{t}",
                          h + f"intermediate.dense.{t}": o + f"fc1.{t}", h + f"output.dense.{t}": o + f"fc2.{t}",
                          h + f"output.LayerNorm.{t}": o + f"ln2.{t}"})
    return names


# ----------------------------------------------------------------------------------------------------------------------
# 6. Input builders (the collator of MPNet's fairseq task, vectorised; spec mpnet.md Sec. 1)
#
# From a batch of token ids (B, N) and optional word-start flags, all three objectives share one random draw: the same
# seed selects the same predicted tokens whatever the objective, so recipes are compared on equal footing.
#   1. P = round(pred_ratio * N), one P for the batch (capped so every row has P predictable tokens)
#   2. a permutation per row whose last P entries are predictable tokens (never special, never padding),
#      at token level or whole-word level (words permuted as units, then the predicted block reshuffled token-wise)
#   3. 80/10/10 corruption of the P predicted tokens, drawn once (both mask copies of MPNet share it)


def predictable(input_ids, cfg):
    """(B, N) bool: tokens that may be predicted (not in cfg.special_ids; padding is special)."""
    special = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=input_ids.device)
    special[list(cfg.special_ids)] = True
    return ~special[input_ids]


def permute(input_ids, cfg, generator, word_starts=None):
    """Returns (perm (B, N), P): perm[:, :C] non-predicted, perm[:, C:] predicted in prediction order."""
    B, N = input_ids.shape
    ok = predictable(input_ids, cfg)
    P = min(round(cfg.pred_ratio * N), int(ok.sum(1).min()))
    if P < 1:
        raise ValueError("a row has no predictable token (all special or padding), or pred_ratio * N rounds to 0")
    score = torch.rand(B, N, generator=generator, device=generator.device)
    if cfg.whole_word and word_starts is not None:
        word_starts = word_starts.clone()
        word_starts[:, 0] = True
        word_id = word_starts.long().cumsum(1) - 1  # (B, N): index of the word each token belongs to
        score = score.gather(1, word_id)  # one random score per word: its tokens move together
    score = torch.where(ok, score, -1.0)  # unpredictable tokens sort first: never in the last P
    perm = torch.sort(score, dim=1, stable=True).indices  # stable keeps a word's tokens in order
    # Re-shuffle the predicted block at token level (MPNet does this after whole-word permutation)
    shuffle = torch.rand(B, P, generator=generator, device=generator.device).argsort(1)
    perm = torch.cat([perm[:, :N - P], perm[:, N - P:].gather(1, shuffle)], 1)
    return perm, P


def corrupt(targets, cfg, generator):
    """BERT's 80/10/10 (Devlin et al. arXiv 1810.04805 Sec. 3.1): [MASK], random non-special token, or unchanged."""
    u = torch.rand(targets.shape, generator=generator, device=generator.device)
    normal = predictable(torch.arange(cfg.vocab_size, device=targets.device)[None], cfg)[0].nonzero()[:, 0]
    rand_tok = normal[torch.randint(len(normal), targets.shape, generator=generator, device=generator.device)]
    out = torch.where(u < cfg.mask_prob + cfg.random_prob, rand_tok, targets)
    return torch.where(u < cfg.mask_prob, cfg.mask_id, out)


def make_batch(input_ids, cfg, generator, word_starts=None, objective=None):
    """Build the model input for objective "mpnet" | "plm" | "mlm" (default cfg.objective) from (B, N) token ids.
    Returns a dict with "kind", "input_ids", "targets" (B, P) and "positions" (two-stream) or "pred_positions" (MLM)."""
    objective = objective or cfg.objective
    perm, P = permute(input_ids, cfg, generator, word_starts)
    pred = perm[:, -P:]  # (B, P) original positions of the predicted tokens
    targets = input_ids.gather(1, pred)  # original tokens, never corrupted
    masked = corrupt(targets, cfg, generator)  # drawn once, shared by both copies
    content = input_ids.gather(1, perm)  # (B, N) permuted sentence, predicted tokens uncorrupted
    if objective == "mpnet":  # [content N | mask copies P | query P], positions compensated
        return dict(kind="mpnet", input_ids=torch.cat([content, masked, masked], 1),
                    positions=torch.cat([perm, pred, pred], 1), targets=targets)
    if objective == "plm":  # XLNet-style: only the queries, all plain [MASK] (as in MPNet's plm mode)
        return dict(kind="plm", input_ids=torch.cat([content, torch.full_like(masked, cfg.mask_id)], 1),
                    positions=torch.cat([perm, pred], 1), targets=targets)
    if objective == "mlm":  # BERT: corrupt in place, natural order
        batch = dict(kind="mlm", input_ids=input_ids.scatter(1, pred, masked), pred_positions=pred, targets=targets)
        if (input_ids == cfg.pad_id).any():
            batch["attention_mask"] = (input_ids != cfg.pad_id).long()
        return batch
    raise ValueError(f"unknown objective {objective!r}; use 'mpnet', 'plm' or 'mlm'")


# ----------------------------------------------------------------------------------------------------------------------
# 8. Learning-rate schedules


def lr_multiplier(step, warmup_steps, total_steps, decay="linear", min_ratio=0.0):
    """Multiplier of the peak learning rate at `step` (0-based): linear warmup that starts above zero, then linear
    decay to min_ratio at total_steps (MPNet/fairseq polynomial_decay with power 1) or half a cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
