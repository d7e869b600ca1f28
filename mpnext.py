"""
MPNext: MPNet (masked and permuted pre-training) in one readable file, plus the ideas of its time to combine with it.

    MPNet: Masked and Permuted Pre-training for Language Understanding
    Song, Tan, Qin, Lu, Liu -- arXiv 2004.09297 (NeurIPS 2020)

The objective in one breath (paper Sec. 2.2): sample a permutation z of the N positions of a sentence; the last
P = round(pred_ratio * N) entries of z are "predicted", the first C = N - P are "non-predicted". Predict them one by
one in permuted order, like XLNet's permuted LM (PLM, arXiv 1906.08237), so later predictions depend on earlier ones,
and also feed P [MASK] symbols that carry the *positions* of all predicted tokens ("position compensation"), so every
prediction sees where the whole sentence is, as BERT's MLM does:

    L_MPNet = - sum_{t=C+1..N} log P(x_{z_t} | x_{z_<t}, M_{z_>C})                                     # Sec. 2.2

Reading guide (small pieces first, the model last):
    1. config ............. MPNextConfig and its presets
    2. activations ........ GELU (erf), Mish (arXiv 1908.08681)
    3. positions .......... T5-style bucketed relative position bias (arXiv 1910.10683 Sec. 2.1), as MPNet uses it
    4. two-stream masks ... content / query masks of MPNet and of PLM, and a text renderer for them
    5. the model .......... attention, block, ELECTRA / SpanBERT heads, MPNext (both encoders, every loss), HF interop
    6. input builders ..... masking units, permutation, 80/10/10 corruption, MLM / PLM / MPNet batches, SBO, RTD
    7. fine-tuning ........ pooling and the classification head's batches
    8. optimizers ......... AdamW, RAdam, Lookahead, GC, AGC, Ranger, Ranger21 (and a factory for train.py)
    9. schedules .......... warmup + linear / cosine decay
The training loop is in train.py; everything else (fine-tuning runs, probe, compare, benchmark) is the `lab` package.

Shapes: B batch, N tokens of a sentence, P predicted tokens (per row at most), C = N - P, W non-predicted slots,
T rows fed to the encoder, S rows that are keys and values (the content stream), R replaced tokens (ELECTRA) or
selected rows, H heads, hs head size, D = d_model, E embedding width, V vocabulary, L = max_len.
"""

import json
import math
import os
from dataclasses import dataclass, replace
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
    max_len: int = 128  # longest sequence; the position table has max_len + 2 rows (fairseq's position offset)
    # -- architecture knobs
    activation: str = "gelu"  # "gelu" (MPNet, erf form) or "mish" (arXiv 1908.08681), used in the FFN and the LM head
    pre_ln: bool = False  # False = post-LN blocks as in MPNet/BERT; True = pre-LN blocks plus a final LayerNorm
    dropout: float = 0.1  # dropout on embeddings, attention output and FFN output
    attn_dropout: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-5  # fairseq's default; HF's MPNetConfig class default (1e-12) is NOT what MPNet used
    rel_buckets: int = 32  # relative position buckets, half for keys on the left, half for keys on the right
    rel_max_distance: int = 128  # distances beyond this share the last bucket
    rel_init: str = "local"  # "local": head h starts with bias -2^(1-h) * log2(1 + distance); "normal": N(0, 0.02)
    d_embed: int = 0  # embedding width E, projected to d_model (ALBERT/ELECTRA); 0 = d_model; HF export needs 0
    # -- token ids the model and the input builders must know
    pad_id: int = 1  # padding (fairseq's and HF MPNet's id): never predicted, never a key, position row 1
    mask_id: int = 4  # the [MASK] symbol fed to predicted positions
    special_ids: tuple = (0, 1, 2, 3, 4)  # never predicted, never drawn as random replacements (pad and mask included)
    # -- pre-training objective (Sec. 2 of the paper; `mlm` and `plm` are the variants of its ablation study)
    objective: str = "mpnet"  # "mpnet" (PLM + position compensation), "plm" (XLNet-style), "mlm" (BERT-style)
    pred_ratio: float = 0.15  # fraction of a row's non-pad tokens that is predicted (its budget)
    mask_prob: float = 0.8  # of the predicted tokens: fed as [MASK] ...
    random_prob: float = 0.1  # ... fed as a random non-special token; the rest (0.1) keep the original token
    masking: str = "token"  # unit that is hidden and permuted: "token", "word" (whole words) or "span" (SpanBERT)
    span_p: float = 0.2  # --masking span: lengths in words ~ Geometric(span_p) truncated to [1, span_max]
    span_max: int = 10  # --masking span: longest span, in words (SpanBERT: p 0.2, at most 10 words)
    return_mlm: bool = False  # MPNet's --return-mlm: add an MLM loss on the mask-copy rows of the content stream
    # -- extra heads (section 6): ELECTRA replaced-token detection, SpanBERT span boundary objective
    rtd: bool = False  # ELECTRA: a small generator fills in tokens, the main model spots the replaced ones
    rtd_weight: float = None  # lambda of the discriminator loss; unset: 50 for mlm (ELECTRA), 10 for mpnet/plm
    rtd_ratio: float = 0.15  # mpnet/plm + rtd: share of the non-predicted ordinary tokens the generator replaces
    gen_width: float = 0.25  # generator hidden size as a fraction of d_model (ELECTRA's best: 1/4 to 1/2); same depth
    sbo: bool = False  # SpanBERT's span boundary objective on the predicted spans (weight 1)
    # -- fine-tuning (section 7)
    n_classes: int = 0  # classes of the sequence-classification head; 0 = no head (pre-training)
    pooling: str = "first"  # its input: "first" (the <s> row, MPNet/RoBERTa) or "mean" over the non-pad rows

    @classmethod
    def from_preset(cls, name, seq_len=0, **overrides):  # max_len: the preset's, or seq_len if longer
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "max_len": max(PRESETS[name]["max_len"], seq_len), **overrides})


PRESETS = {
    # for CPU runs; no dropout, which only slows a model that sees its data a few times (cramming, arXiv 2212.14034)
    "tiny": dict(n_layer=4, n_head=4, d_model=128, d_ff=512, max_len=128, dropout=0.0, attn_dropout=0.0),
    "small": dict(n_layer=6, n_head=8, d_model=256, d_ff=1024, max_len=256),
    "medium": dict(n_layer=8, n_head=8, d_model=512, d_ff=2048, max_len=512),
    # MPNet-base (hub config microsoft/mpnet-base): fairseq ids <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> appended last
    "base": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, max_len=512, vocab_size=30527,
                 pad_id=1, mask_id=30526, special_ids=(0, 1, 2, 3, 30526)),
}

# What a checkpoint decides when training starts from it (--init): the architecture and the vocabulary
ARCH_FIELDS = {"vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_len", "d_embed", "pre_ln", "activation",
               "rel_buckets", "rel_max_distance", "layer_norm_eps"}

# The allowed values of the string fields and of train.py's optimizer and schedule flags (check_config reads it too)
CHOICES = dict(activation=("gelu", "mish"), rel_init=("local", "normal"), objective=("mpnet", "plm", "mlm"),
               masking=("token", "word", "span"), pooling=("first", "mean"), decay=("linear", "cosine"),
               optimizer=("adamw", "radam", "ranger", "ranger21"))

# ----------------------------------------------------------------------------------------------------------------------
# 2. Activations


def mish(x):
    """Mish (Misra, arXiv 1908.08681): x * tanh(softplus(x)); F.softplus is the identity for x > 20: no overflow."""
    return x * torch.tanh(F.softplus(x))


ACTIVATIONS = {"gelu": F.gelu, "mish": mish}  # F.gelu is the exact erf form, as fairseq and HF MPNet use
assert tuple(ACTIVATIONS) == CHOICES["activation"]

# ----------------------------------------------------------------------------------------------------------------------
# 3. Relative position bias (MPNet uses T5's bucketed scalar bias, arXiv 1910.10683 Sec. 2.1)
#
# One table of `rel_buckets x n_head` scalars, added to the attention logits of every layer. The distance is taken
# between ORIGINAL positions, so a permuted sequence sees the same bias as the sentence in natural order: that is what
# lets the two-stream encoder move tokens around freely (paper Sec. 2.2).


def relative_bucket(q_pos, k_pos, n_buckets=32, max_distance=128):
    """Bucket of key k seen from query q, n = q - k: the upper half for keys on the right (n < 0); in a half, 0..7
    exact, then log-spaced up to max_distance, then the last. 32 buckets: n = 0, 3, -3, 20, 500 -> 0, 3, 19, 10, 15."""
    n = q_pos[..., :, None] - k_pos[..., None, :]  # (..., Tq, Tk)
    half = n_buckets // 2
    bucket = (n < 0).long() * half  # keys to the right of the query get buckets half..n_buckets-1
    n = n.abs()
    exact = half // 2
    # same float32 arithmetic as fairseq/HF so every bucket boundary agrees with released checkpoints
    log_bucket = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return bucket + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


class DistanceBias(torch.autograd.Function):
    """table[:, index] in `dtype`, (H, ..) from a table (H, K). Its backward is one bincount per head, in fp32: the
    sums of autograd's indexing, which sorts the indices on a CPU and serialises on atomic adds on a GPU."""

    @staticmethod
    def forward(ctx, table, index, dtype):
        ctx.save_for_backward(index)
        ctx.shape, ctx.dtype = table.shape, table.dtype
        return table.to(dtype)[:, index]

    @staticmethod
    def backward(ctx, grad):
        index, acc = ctx.saved_tensors[0].flatten(), torch.promote_types(grad.dtype, torch.float32)
        columns = [torch.bincount(index, g.flatten().to(acc), minlength=ctx.shape[1]) for g in grad]
        return torch.stack(columns).to(ctx.dtype), None, None


def local_bias_init(cfg):
    """Locality prior (rel_buckets, n_head), like ALiBi's slopes (arXiv 2108.12409): head h at -2^(1-h) * log2(1 + d),
    d a bucket's least distance. From MPNet's N(0, 0.02), Adam would take thousands of steps to find the neighbours."""
    half = cfg.rel_buckets // 2
    exact = half // 2
    b = torch.arange(half, dtype=torch.float32)
    d = torch.where(b < exact, b, exact * (cfg.rel_max_distance / exact) ** ((b - exact) / (half - exact)))
    slope = 2.0 ** (1 - torch.arange(cfg.n_head, dtype=torch.float32))  # 2, 1, 1/2, ...
    return (-torch.log2(1 + d)).repeat(2)[:, None] * slope[None, :]


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
# Every row sees one token per original position (N keys, as in fine-tuning): query k the content of p_<k (PLM's
# dependency) and the mask copies of p_>=k (position compensation). Non-predicted and mask-copy rows never see
# predicted content, else p_k would reach query k in two hops.
#
# PLM (XLNet-style, no position compensation) drops the mask copies: T = N + P rows [ content N | query P ];
# query k sees non-predicted + p_<k (C + k - 1 keys), p_k sees non-predicted + p_<=k, non-predicted rows see themselves.

@lru_cache(maxsize=64)
def two_stream_mask(n, p, kind="mpnet"):
    """True = may attend: rows [content | query] x content columns; (N + 2P, N + P) for "mpnet", (N + P, N) for plm."""
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
# One attention call serves both streams: queries are all T rows, keys and values the first `n_kv` (the content
# stream). The mask of Sec. 4 and the relative bias fold into one additive mask (H, B or 1, T, n_kv), heads first.

EXPLICIT_CPU_ATTENTION = True  # False: SDPA on a CPU too (the tests compare both)


def gather_rows(h, rows):
    """h (B, T, D) at rows (B, R) -> (B, R, D)."""
    return h.gather(1, rows[..., None].expand(-1, -1, h.size(-1)))


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.d_model, self.attn_dropout = cfg.n_head, cfg.d_model, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows [W_q; W_k; W_v], shared by both streams
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, xq, xkv, attn_bias):
        """Queries from xq (B, T, D), keys and values from the content rows xkv (B, S, D); attn_bias: bias + mask."""
        B, T, D = xq.shape
        S, H, hs = xkv.shape[1], self.n_head, D // self.n_head
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(xq, w[:D], b[:D]).view(B, T, H, hs)
        k, v = F.linear(xkv, w[D:], b[D:]).view(B, S, 2, H, hs).unbind(2)  # (B, S, H, hs) each
        if q.device.type != "cpu" or not EXPLICIT_CPU_ATTENTION:  # CUDA's kernels take the bias and its gradient
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, rows, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.transpose(0, 1),
                                               dropout_p=self.attn_dropout if self.training else 0.0)
            return self.proj(y.transpose(1, 2).reshape(B, T, D))
        # On a CPU, SDPA runs a bias with a gradient on a fallback path that upcasts bf16 and checks every row for being
        # fully masked; the steps below do neither. Heads outermost, so that a per-row bias (two streams) is a view.
        q, k, v = (t.permute(2, 0, 1, 3).reshape(H * B, -1, hs) for t in (q, k, v))  # (H * B, rows, hs)
        # softmax(q k^T / sqrt(hs) + bias + mask) v, the bias added by the matmul         # Vaswani et al. Eq. (1)
        scores = torch.baddbmm(attn_bias.expand(H, B, T, S).reshape(H * B, T, S), q, k.transpose(1, 2),
                               alpha=hs ** -0.5)  # (H * B, T, S)
        p = F.dropout(scores.softmax(-1), self.attn_dropout, self.training)
        y = torch.bmm(p, v).view(H, B, T, hs)
        return self.proj(y.permute(1, 2, 0, 3).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    """Transformer layer. Post-LN (MPNet, BERT): x = LN(x + f(x)). Pre-LN: x = x + f(LN(x)). rows: see run_layers."""

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

    def forward(self, x, attn_bias, n_kv, rows=None):
        pick = (lambda h: h) if rows is None else (lambda h: gather_rows(h, rows))
        if self.pre_ln:
            h = self.ln1(x)
            x = pick(x) + self.drop(self.attn(pick(h), h[:, :n_kv], attn_bias))
            return x + self.ffn(self.ln2(x))
        xq = pick(x)
        x = self.ln1(xq + self.drop(self.attn(xq, x[:, :n_kv], attn_bias)))
        return self.ln2(x + self.ffn(x))


class DiscriminatorHead(nn.Module):
    """ELECTRA's "was token t replaced?" (arXiv 2003.10555 Sec. 2): sigmoid(w^T act(W h_t + b) + c), no LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, 1)

    def forward(self, h):
        return self.out(self.act(self.dense(h))).squeeze(-1)  # (B, T) logits


SBO_MAX_OFFSET = 32  # rows of the SBO position table; span tokens further from the left boundary get no SBO term


class SpanBoundaryHead(nn.Module):
    """SpanBERT's span boundary objective (Joshi et al., arXiv 1907.10529 Sec. 3.2): token i of a span s..e from the
    tokens outside it and its place: h = LayerNorm(act(W1 [x_{s-1}; x_{e+1}; p_{i-s+1}])), y = LayerNorm(act(W2 h)),
    then the tied decoder with a bias of its own. SpanBERT's p has 200 dims; ours d_model."""

    def __init__(self, cfg):
        super().__init__()
        D, E = cfg.d_model, cfg.d_embed or cfg.d_model
        self.act = ACTIVATIONS[cfg.activation]
        self.pos = nn.Embedding(SBO_MAX_OFFSET, D)  # p: offset of the target from the span's first token
        self.fc1 = nn.Linear(3 * D, D)
        self.ln1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.fc2 = nn.Linear(D, E)
        self.ln2 = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, left, right, offset):
        h = self.ln1(self.act(self.fc1(torch.cat([left, right, self.pos(offset)], -1))))  # Sec. 3.2, first layer
        return self.ln2(self.act(self.fc2(h)))  # y_i, (B, P, E)


class ClassificationHead(nn.Module):
    """MPNet's (RoBERTa's; HF MPNetClassificationHead) on the pooled state: dropout, dense, tanh, dropout, out_proj."""

    def __init__(self, cfg):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, pooled):
        return self.out_proj(self.drop(torch.tanh(self.dense(self.drop(pooled)))))  # (B, n_classes)


@torch.no_grad()
def auc(scores, positive, scored):
    """ROC AUC over the `scored` entries (Mann-Whitney: ties count half; NaN without both classes). ELECTRA logs it:
    it sees a weak detector rank replaced tokens higher while precision and recall at 0.5 are still 0. No GPU sync."""
    negatives = torch.where(scored & ~positive, scores, math.inf).flatten().sort().values  # +inf: not a negative
    s = scores.flatten().contiguous()
    below = torch.searchsorted(negatives, s).float()  # negatives strictly below each score ...
    ties = torch.searchsorted(negatives, s, right=True) - below  # ... and equal to it
    wins = ((below + 0.5 * ties) * positive.flatten()).sum()
    n_pos, n_neg = positive.sum(), (scored & ~positive).sum()
    return wins / (n_pos * n_neg)  # 0 / 0 = NaN when undefined


def generator_config(cfg):
    """ELECTRA's generator (Sec. 3.2; get_generator_config): width gen_width x d_model, heads of 64 dims (at least one),
    FFN 4x, same depth; it reads the shared embeddings (width d_model) through a projection, decodes with them tied."""
    d = max(1, round(cfg.d_model * cfg.gen_width))
    h = max(1, d // 64)
    while d % h:
        h -= 1
    return replace(cfg, d_model=d, n_head=h, d_ff=4 * d, d_embed=cfg.d_embed or cfg.d_model, objective="mlm",
                   rtd=False, sbo=False, return_mlm=False)


def check_config(cfg):
    """One clear ValueError for a config the model or the builders cannot run."""
    for name, allowed in CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in allowed:
            raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; choose one of: {', '.join(allowed)}")
    for name in ("n_layer", "n_head", "d_model", "d_ff", "max_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be at least 1")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"d_model={cfg.d_model} must be a multiple of n_head={cfg.n_head}")
    if not (0 <= cfg.dropout < 1 and 0 <= cfg.attn_dropout < 1 and cfg.layer_norm_eps > 0):
        raise ValueError(f"dropout={cfg.dropout}, attn_dropout={cfg.attn_dropout}, layer_norm_eps={cfg.layer_norm_eps}:"
                         f" dropouts must be in [0, 1), layer_norm_eps positive")
    if cfg.rel_buckets < 4 or cfg.rel_buckets % 2:
        raise ValueError(f"rel_buckets={cfg.rel_buckets}: need an even number >= 4 (half per side)")
    if cfg.rel_max_distance <= cfg.rel_buckets // 4:  # the log-spaced buckets start at rel_buckets / 4
        raise ValueError(f"rel_max_distance={cfg.rel_max_distance}: must exceed rel_buckets / 4 = "
                         f"{cfg.rel_buckets // 4} (default 128)")
    if cfg.rtd_weight is not None and not cfg.rtd_weight > 0:
        raise ValueError(f"rtd_weight={cfg.rtd_weight}: must be positive (unset: 50 for mlm, 10 for mpnet/plm)")
    if cfg.d_embed < 0:
        raise ValueError(f"d_embed={cfg.d_embed}: use 0 (= d_model) or a positive width")
    if not (0 < cfg.pred_ratio <= 1 and 0 <= cfg.mask_prob and 0 <= cfg.random_prob and
            cfg.mask_prob + cfg.random_prob <= 1):
        raise ValueError(f"pred_ratio={cfg.pred_ratio}, mask_prob={cfg.mask_prob}, random_prob={cfg.random_prob}: "
                         f"need 0 < pred_ratio <= 1 and mask_prob, random_prob >= 0 with a sum <= 1")
    if not (0 < cfg.span_p < 1 and cfg.span_max >= 1):
        raise ValueError(f"span_p={cfg.span_p}, span_max={cfg.span_max}: need 0 < span_p < 1 and span_max >= 1")
    if cfg.rtd and not (0 < cfg.gen_width <= 1 and 0 < cfg.rtd_ratio <= 1):
        raise ValueError(f"gen_width={cfg.gen_width}, rtd_ratio={cfg.rtd_ratio}: both must be in (0, 1]")
    if cfg.n_classes < 0 or cfg.n_classes == 1:
        raise ValueError(f"n_classes={cfg.n_classes}: 0 (no head) or at least 2")
    if is_electra(cfg) and cfg.sbo:
        raise ValueError("--sbo with --objective mlm --rtd: the discriminator reads the generator's samples inside "
                         "each span (often the true tokens), so its boundary rows would leak the span; use mpnet/plm")


def disc_weight(cfg, objective):
    """lambda of the discriminator loss, cfg.rtd_weight if set. ELECTRA's 50 weighs the BCE against ANOTHER network's
    loss (the generator's); with mpnet/plm one encoder carries both BCE and permuted LM, so the default there is 10."""
    return cfg.rtd_weight if cfg.rtd_weight is not None else (50.0 if objective == "mlm" else 10.0)


def is_electra(cfg):
    """Classic ELECTRA: the main model is a discriminator without an LM loss; the generator is the one that fills in."""
    return cfg.objective == "mlm" and cfg.rtd


def mlm_probe(cfg):
    """The score every objective shares: BERT's MLM (token masking, natural order, no extra heads) at the run's
    pred_ratio, so a PLM- or MPNet-trained model is scored on the same task as an MLM one."""
    return replace(cfg, objective="mlm", masking="token", rtd=False, sbo=False)


def recipe(cfg):
    """"mpnet", "mpnet+span+sbo", "mlm+rtd", ...: the objective and what is added to it."""
    return "+".join([cfg.objective] + [cfg.masking] * (cfg.masking != "token") + ["rtd"] * cfg.rtd + ["sbo"] * cfg.sbo
                    + ["return_mlm"] * cfg.return_mlm)


class MPNext(nn.Module):
    """MPNet encoder with a tied LM head. Two ways in:
    - forward(input_ids, attention_mask) -> logits (B, T, V): natural order (fine-tuning, MLM; HF's MPNetForMaskedLM)
    - two_stream(input_ids, positions, n_pred, kind) -> logits (B, P, V): the pre-training layout of Sec. 4.
    cfg.rtd: ELECTRA's generator and discriminator; cfg.sbo: SBO's head; n_classes: a classifier; loss() trains all."""

    def __init__(self, cfg):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        D, E = cfg.d_model, cfg.d_embed or cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, E)
        # fairseq's learned positions: row 1 is the padding row, real position i uses row i + 2 (row 0 unused)
        self.pos_emb = nn.Embedding(cfg.max_len + 2, E)
        self.emb_ln = nn.LayerNorm(E, eps=cfg.layer_norm_eps)  # MPNet normalises the embeddings (post-LN setup)
        self.emb_proj = nn.Linear(E, D) if E != D else nn.Identity()  # factorised embeddings (ALBERT, ELECTRA's G)
        self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)  # shared by all layers
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.pre_ln else nn.Identity()
        # LM head (RoBERTa/MPNet): dense -> activation -> LayerNorm -> decoder tied to tok_emb, plus its own bias
        self.head_dense = nn.Linear(D, E)
        self.head_ln = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.rtd:
            self.disc = DiscriminatorHead(cfg)
        if cfg.sbo:
            self.sbo = SpanBoundaryHead(cfg)
        if cfg.n_classes:
            self.classifier = ClassificationHead(cfg)
        self.apply(self._init_weights)
        with torch.no_grad():  # fairseq zeroes the padding rows
            self.tok_emb.weight[cfg.pad_id].zero_()
            self.pos_emb.weight[1].zero_()
            if cfg.rel_init == "local":
                self.rel_bias.weight.copy_(local_bias_init(cfg))
        if cfg.rtd:  # built after the init above, which would overwrite its own relative-bias prior
            self.generator = MPNext(generator_config(cfg))
            # ELECTRA ties the token and position embeddings and their LayerNorm (Sec. 3.2: "tie embeddings only")
            g = self.generator
            g.tok_emb, g.pos_emb, g.emb_ln = self.tok_emb, self.pos_emb, self.emb_ln

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
        return self.emb_proj(self.drop(self.emb_ln(self.tok_emb(input_ids) + self.pos_emb(rows))))

    def attention_bias(self, q_pos, k_pos, allowed, dtype):
        """Relative bias (H, B or 1, Tq, Tk) in `dtype` for queries q_pos (B or 1, Tq), keys k_pos, read per distance;
        the dtype's finite minimum where `allowed` (B or 1, 1, Tq, Tk) is False (a blocked row: uniform, not NaN)."""
        L, H = self.cfg.max_len, self.cfg.n_head
        distance = torch.arange(-L, L + 1, device=q_pos.device)
        buckets = relative_bucket(distance, distance[L:L + 1], self.cfg.rel_buckets, self.cfg.rel_max_distance)
        w = self.rel_bias.weight
        blocked = torch.full((H, 1), torch.finfo(dtype).min, dtype=torch.promote_types(w.dtype, dtype), device=w.device)
        table = torch.cat([w[buckets[:, 0]].t().to(blocked.dtype), blocked], 1)  # (H, 2L + 2)
        index = q_pos[..., :, None] - k_pos[..., None, :] + L  # (B or 1, Tq, Tk): column of the distance q - k
        return DistanceBias.apply(table, torch.where(allowed[:, 0], index, 2 * L + 1), dtype)

    def run_layers(self, x, q_pos, k_pos, allowed, rows=None):
        """The blocks over the embedded rows x (B, T, D): queries at q_pos (B or 1, T), keys and values the first
        k_pos.shape[1] rows, attention where `allowed` (B or 1, 1, T, n_kv). With `rows` (B, R), only those rows' states
        (B, R, D): a row no loss reads is needed only as a key and value below the top, so the top layer skips it."""
        dtype, n_kv = self._compute_dtype(x), k_pos.shape[1]
        below = self.blocks if rows is None else self.blocks[:-1]
        if len(below):
            bias = self.attention_bias(q_pos, k_pos, allowed, dtype)
        for block in below:
            x = block(x, bias, n_kv)
        if rows is None:
            return self.ln_f(x)
        top = self.blocks[-1]
        B = rows.shape[0]
        allowed = allowed.expand(B, -1, -1, -1).gather(2, rows[:, None, :, None].expand(-1, 1, -1, n_kv))
        bias = self.attention_bias(q_pos.expand(B, -1).gather(1, rows), k_pos, allowed, dtype)  # (H, B, R, n_kv)
        return self.ln_f(top(x, bias, n_kv, rows))

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

    def encode(self, input_ids, attention_mask=None, rows=None):
        """Hidden states (B, T, D), or (B, R, D) of `rows` alone; attention_mask (B, T): 1 = token, 0 = padding. As in
        HF/fairseq, the i-th non-pad token has absolute position i (pads none), and the relative bias uses arange(T)."""
        B, T = input_ids.shape
        self._check_length(T)
        not_pad = (input_ids != self.cfg.pad_id).long()
        positions = (not_pad.cumsum(1) - 1).clamp(min=0)  # (B, T)
        x = self.embed(input_ids, positions)
        allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): mask padded keys
        ar = torch.arange(T, device=x.device)[None]
        return self.run_layers(x, ar, ar, allowed, rows)

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.encode(input_ids, attention_mask))  # (B, T, V)

    def classify(self, input_ids, attention_mask):
        """Class logits (B, n_classes) of the fine-tuning head (cfg.n_classes > 0)."""
        return self.classifier(pool(self.encode(input_ids, attention_mask), attention_mask, self.cfg.pooling))

    # -- two streams (pre-training)

    def two_stream_encode(self, input_ids, positions, n_pred, kind="mpnet", rows=None):
        """Hidden states (B, T, D) (the last P rows: query stream), or (B, R, D) of `rows`. input_ids, positions (B, T):
        T = N + 2P ("mpnet": [N permuted tokens | P mask copies | P queries]) or N + P ("plm": [N | P queries]), at the
        ORIGINAL 0-based positions; make_batch checks N, and its fillers make the N content rows W + P."""
        B, T = input_ids.shape
        n = T - 2 * n_pred if kind == "mpnet" else T - n_pred  # sentence length N
        n_kv = T - n_pred  # content stream rows = keys/values
        x = self.embed(input_ids, positions)
        # torch.compile bakes the mask into its graph: call the uncached function there (dynamo warns on lru_cache)
        mask_fn = two_stream_mask.__wrapped__ if torch.compiler.is_compiling() else two_stream_mask
        allowed = mask_fn(n, n_pred, kind).to(x.device)[None, None]  # (1, 1, T, n_kv)
        key_pad = input_ids[:, :n_kv] == self.cfg.pad_id  # padding is never a key
        allowed = allowed & ~key_pad[:, None, None, :]  # (B, 1, T, n_kv)
        return self.run_layers(x, positions, positions[:, :n_kv], allowed, rows)

    def two_stream(self, input_ids, positions, n_pred, kind="mpnet"):
        self._check_length(input_ids.shape[1] - (2 if kind == "mpnet" else 1) * n_pred)  # a layout without fillers
        h = self.two_stream_encode(input_ids, positions, n_pred, kind)
        return self.lm_head(h[:, -n_pred:])  # (B, P, V): the LM head runs on the query rows only

    # -- the pre-training loss

    def loss(self, batch):
        """The weighted sum of the losses the batch (section 6) asks for: LM, --return-mlm, ELECTRA's generator and
        discriminator, SBO; each a mean over its own targets, as ELECTRA's and SpanBERT's code average them, so the
        weights mean what the papers mean. Returns (loss, metrics): "<name>_loss" of each, accuracies, RTD stats."""
        kind, ids = batch["kind"], batch["input_ids"]
        losses, metrics = {}, {}
        if "rtd_targets" in batch:  # ELECTRA: the generator's samples go into the input, labels say where
            ids, replaced = self.replace_tokens(batch, losses, metrics)
        rows, P = None, 0  # the rows of the LM loss: the masked rows (mlm) or the query stream, (B, P)
        if "targets" in batch:  # the objective's own LM loss (absent only for ELECTRA's discriminator)
            B, T, P = *ids.shape, batch["targets"].shape[1]
            rows = batch["pred_positions"] if kind == "mlm" else torch.arange(T - P, T, device=ids.device).expand(B, -1)
        # when no other loss reads a row, the top layer computes the P rows alone (run_layers)
        need_all_rows = any(k in batch for k in ("rtd_targets", "labels", "sbo_targets")) or (
            kind == "mpnet" and self.cfg.return_mlm)
        top_rows = None if need_all_rows else rows
        if kind in ("mlm", "cls"):
            h = self.encode(ids, batch.get("attention_mask"), top_rows)  # (B, N, D), or (B, P, D) of the rows
        else:  # (B, T, D) with the query rows last, or (B, P, D)
            h = self.two_stream_encode(ids, batch["positions"], P, kind, top_rows)
        if rows is not None:
            out = h if top_rows is not None else gather_rows(h, rows)  # (B, P, D)
            losses["lm"], metrics["acc"] = token_loss(self.lm_head(out), batch["targets"])
            if kind == "mpnet" and self.cfg.return_mlm:  # the mask-copy rows see exactly BERT's MLM context
                losses["return_mlm"], _ = token_loss(self.lm_head(h[:, -2 * P:-P]), batch["targets"])
        if "rtd_targets" in batch:  # the discriminator scores the rows of rtd_scored (Sec. 6 says which)
            scored = batch["rtd_scored"]
            replaced = replaced[:, :scored.shape[1]]
            logits = self.disc(h[:, :scored.shape[1]]).float()  # (B, rows), BCE in fp32
            bce = F.binary_cross_entropy_with_logits(logits, replaced.float(), reduction="none")
            n = scored.sum().clamp(min=1)
            losses["disc"] = (bce * scored).sum() / n
            guess, hit = logits > 0, replaced & scored
            metrics.update(replaced=hit.sum() / n, disc_acc=((guess == replaced) & scored).sum() / n,
                           disc_precision=(guess & hit).sum() / (guess & scored).sum().clamp(min=1),
                           disc_recall=(guess & hit).sum() / hit.sum().clamp(min=1), disc_auc=auc(logits, hit, scored))
        if "labels" in batch:  # fine-tuning: one label per sequence (section 7)
            logits = self.classifier(pool(h, batch["attention_mask"], self.cfg.pooling)).float()  # (B, n_classes)
            losses["cls"] = F.cross_entropy(logits, batch["labels"])
            metrics["acc"] = (logits.argmax(-1) == batch["labels"]).float().mean()
        if "sbo_targets" in batch:  # boundaries are rows that never saw the span (section 6, span_boundaries)
            y = self.sbo(gather_rows(h, batch["sbo_left"]), gather_rows(h, batch["sbo_right"]), batch["sbo_offset"])
            logits = F.linear(y, self.tok_emb.weight, self.sbo.bias)  # tied decoder, own bias
            losses["sbo"], metrics["sbo_acc"] = token_loss(logits, batch["sbo_targets"])
        total = sum(v * (disc_weight(self.cfg, kind) if k == "disc" else 1.0) for k, v in losses.items())
        metrics.update({f"{k}_loss": v.detach() for k, v in losses.items()}, loss=total.detach())
        return total, metrics

    def replace_tokens(self, batch, losses, metrics):
        """ELECTRA Sec. 2: the generator predicts the tokens hidden from it (MLM loss, weight 1) and samples x^ at
        temperature 1, without grad, never a special token, by inverting its CDF at the batch's uniforms rtd_u.
        Only an x^ that differs from the original counts as replaced (ELECTRA: "moderately improved" results)."""
        gen, targets, slots = self.generator, batch["rtd_targets"], batch["rtd_slots"]
        h = gen.encode(batch["gen_ids"], batch["gen_attention_mask"], batch["rtd_positions"])  # (B, R, D_G)
        logits = gen.lm_head(h).float()  # (B, R, V)
        losses["gen"], metrics["gen_acc"] = token_loss(logits, targets)
        with torch.no_grad():
            special = ~predictable(torch.arange(self.cfg.vocab_size, device=logits.device)[None], self.cfg)[0]
            cdf = logits.masked_fill(special, -math.inf).softmax(-1).cumsum(-1)  # (B, R, V)
            u = batch["rtd_u"][..., None] * cdf[..., -1:]
            x_hat = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=self.cfg.vocab_size - 1)
        valid = targets != IGNORE
        ids = batch["input_ids"]
        ids = ids.scatter(1, slots, torch.where(valid, x_hat, ids.gather(1, slots)))  # slots are distinct per row
        replaced = torch.zeros_like(ids, dtype=torch.bool).scatter(1, slots, valid & (x_hat != targets))
        return ids, replaced

    # -- Hugging Face interop

    @classmethod
    def from_hf(cls, model_or_path, **overrides):
        """Load an HF MPNetForMaskedLM, or MPNetModel (its LM head stays fresh): object, directory or hub name. mask_id
        defaults to the last id, where fairseq appends <mask> (30526 in microsoft/mpnet-base), or pass mask_id."""
        from transformers import MPNetForMaskedLM
        hf = MPNetForMaskedLM.from_pretrained(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) \
            else model_or_path
        hc = hf.config
        if hc.hidden_act not in ACTIVATIONS:
            raise ValueError(f"MPNet checkpoint uses activation {hc.hidden_act!r}; MPNext supports {list(ACTIVATIONS)}")
        mask_id = overrides.pop("mask_id", hc.vocab_size - 1)
        specials = tuple(sorted({i for i in (hc.bos_token_id, 1, hc.eos_token_id, 3, mask_id) if i is not None}))
        cfg = MPNextConfig(**{**dict(
            vocab_size=hc.vocab_size, n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads,
            d_model=hc.hidden_size, d_ff=hc.intermediate_size, max_len=hc.max_position_embeddings - 2,
            activation=hc.hidden_act, dropout=hc.hidden_dropout_prob, attn_dropout=hc.attention_probs_dropout_prob,
            layer_norm_eps=hc.layer_norm_eps, rel_buckets=hc.relative_attention_num_buckets,
            pad_id=1, mask_id=mask_id, special_ids=specials), **overrides})  # HF hard-codes padding_idx = 1
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
        fresh = ("head_", "generator.", "disc.", "sbo.")  # no head in an MPNetModel; heads HF does not have
        assert not unexpected and all(k.startswith(fresh) for k in missing), (missing, unexpected)
        return model

    def to_hf(self, out_dir, labels=None):
        """Write an HF MPNetForMaskedLM (MPNetForSequenceClassification if n_classes > 0), same logits, no transformers
        needed. The generator and RTD / SBO heads stay behind, as ELECTRA discards its generator (after mlm + rtd the
        LM head is untrained). Dropout 0 goes out as MPNet's 0.1, the value HF fine-tuning users expect."""
        cfg = self.cfg
        check_hf_exportable(cfg)
        sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        out = {hf_key: sd[our_key] for hf_key, our_key in _hf_names(cfg.n_layer).items()  # a classifier: no LM head
               if not (cfg.n_classes and hf_key.startswith("lm_head."))}
        if not cfg.n_classes:
            out["lm_head.decoder.weight"], out["lm_head.decoder.bias"] = sd["tok_emb.weight"], sd["head_bias"]
        for k in ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias") if cfg.n_classes else ():
            out["classifier." + k] = sd["classifier." + k]
        for i in range(cfg.n_layer):
            qw, kw, vw = sd[f"blocks.{i}.attn.qkv.weight"].chunk(3)
            qb, kb, vb = sd[f"blocks.{i}.attn.qkv.bias"].chunk(3)
            a = f"mpnet.encoder.layer.{i}.attention.attn."
            out.update({a + "q.weight": qw, a + "k.weight": kw, a + "v.weight": vw,
                        a + "q.bias": qb, a + "k.bias": kb, a + "v.bias": vb})
        hf_config = dict(
            architectures=["MPNetForSequenceClassification" if cfg.n_classes else "MPNetForMaskedLM"],
            model_type="mpnet", vocab_size=cfg.vocab_size,
            id2label=dict(enumerate(labels or [f"LABEL_{i}" for i in range(max(cfg.n_classes, 2))])),
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
            intermediate_size=cfg.d_ff, hidden_act="gelu", hidden_dropout_prob=cfg.dropout or 0.1,
            attention_probs_dropout_prob=cfg.attn_dropout or 0.1, max_position_embeddings=cfg.max_len + 2,
            initializer_range=0.02, layer_norm_eps=cfg.layer_norm_eps,
            relative_attention_num_buckets=cfg.rel_buckets, pad_token_id=cfg.pad_id, tie_word_embeddings=True)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        out = {k: v.clone().contiguous() for k, v in out.items()}  # tied tensors apart: safetensors stores each once
        try:
            from safetensors.torch import save_file
            save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        except ImportError:
            torch.save(out, os.path.join(out_dir, "pytorch_model.bin"))


def check_hf_exportable(cfg):
    """A ValueError unless HF's MPNet can hold this model."""
    if cfg.pre_ln or cfg.activation != "gelu" or cfg.d_embed not in (0, cfg.d_model):
        raise ValueError("HF MPNet only has post-LN blocks, a GELU LM head and embeddings of width d_model: "
                         "--pre-ln, --activation mish and --d-embed models cannot be exported")
    if cfg.pad_id != 1:  # HF's MPNetEmbeddings hard-codes padding_idx = 1 for its position ids
        raise ValueError(f"HF MPNet assumes the padding id is 1; this model pads with {cfg.pad_id}")
    if (cfg.rel_buckets, cfg.rel_max_distance) != (32, 128):  # HF's compute_position_bias hard-codes both
        raise ValueError(f"HF MPNet uses 32 relative buckets up to distance 128; this model has {cfg.rel_buckets} up "
                         f"to {cfg.rel_max_distance}")
    if cfg.n_classes and cfg.pooling != "first":  # MPNetClassificationHead reads the <s> row
        raise ValueError("HF's MPNetForSequenceClassification pools the <s> row; a --pooling mean model cannot go out")


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
            names.update({h + f"attention.attn.o.{t}": o + f"attn.proj.{t}",
                          h + f"attention.LayerNorm.{t}": o + f"ln1.{t}", h + f"intermediate.dense.{t}": o + f"fc1.{t}",
                          h + f"output.dense.{t}": o + f"fc2.{t}", h + f"output.LayerNorm.{t}": o + f"ln2.{t}"})
    return names


# ----------------------------------------------------------------------------------------------------------------------
# 6. Input builders (the collator of MPNet's fairseq task masked_permutation_lm, vectorised), and the inputs of the
#    extra heads: ELECTRA (Clark et al., arXiv 2003.10555) and SpanBERT (Joshi et al., arXiv 1907.10529)
#
# All objectives share one random draw, so the same seed predicts the same tokens whatever the objective:
#   1. masking units: single tokens, whole words, or SpanBERT spans of whole words
#   2. a budget per row, round(pred_ratio x its non-pad tokens), and a random order of the units: the last units are
#      predicted, whole units only, the unit cut by the budget kept or dropped, whichever is nearer the budget
#   3. the predicted block reshuffled token by token: the order of prediction (see permute)
#   4. 80/10/10 corruption of the predicted tokens, drawn once (both MPNet mask copies share it; once per span)
# Rows may predict different numbers of tokens (padding, whole units): P is the largest count, and a row with fewer
# starts its predicted block with fillers (target IGNORE, fed as padding). With one count, the layout is MPNet's.

IGNORE = -100  # target of a filler slot (F.cross_entropy's ignore_index)


def predictable(input_ids, cfg):
    """(B, N) bool: tokens that may be predicted (not in cfg.special_ids; padding is special)."""
    special = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=input_ids.device)
    special[list(cfg.special_ids)] = True
    return ~special[input_ids]


def token_loss(logits, targets):
    """Mean cross-entropy over the targets that are not IGNORE, in fp32 as fairseq, and the accuracy on them."""
    logits, valid = logits.float(), targets != IGNORE
    n = valid.sum().clamp(min=1)
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum") / n
    return loss, ((logits.argmax(-1) == targets) & valid).sum() / n


def truncated_geometric(shape, p, max_len, generator):
    """Span lengths l in 1..max_len with P(l) proportional to p (1 - p)^(l - 1) (SpanBERT Sec. 3.1), by inverting the
    CDF F(l) = (1 - q^l) / (1 - q^max_len), q = 1 - p. Mean for p = 0.2, max_len = 10: 3.80 words."""
    q = 1.0 - p
    u = torch.rand(shape, generator=generator, device=generator.device)
    return torch.ceil(torch.log1p(-u * (1 - q ** max_len)) / math.log(q)).long().clamp(1, max_len)


def masking_units(input_ids, cfg, generator, word_starts=None):
    """(B, N) the unit of each token, numbered left to right: the token ("token"), its word ("word") or its span."""
    B, N = input_ids.shape
    if cfg.masking == "token":
        return torch.arange(N, device=input_ids.device).expand(B, N)
    if word_starts is None:
        raise ValueError(f"masking={cfg.masking!r} needs word-start flags (data.Batches yields them); pass "
                         f"word_starts or use masking='token'")
    starts = word_starts.clone()
    starts[:, 0] = True
    word = starts.long().cumsum(1) - 1  # (B, N) index of each token's word
    if cfg.masking == "word":
        return word
    # SpanBERT draws a length, then an anchor, until the budget is spent; we cut each row into N consecutive spans of
    # drawn lengths (>= 1 word each: they cover it) and let permute pick some: same lengths, one vectorised sort.
    lengths = truncated_geometric((B, N), cfg.span_p, cfg.span_max, generator)
    first_word = (lengths.cumsum(1) - lengths).clamp(max=N)  # (B, N) first word of each span
    span_start = torch.zeros(B, N + 1, dtype=torch.long, device=input_ids.device).scatter_(1, first_word, 1)
    return (span_start[:, :N].cumsum(1) - 1).gather(1, word)  # span of each word, then of each token


def permute(input_ids, unit, cfg, generator):
    """(order (B, N), n_pred (B,)): each row's original positions, non-predicted first, the n_pred predicted last."""
    B, N = input_ids.shape
    ok = predictable(input_ids, cfg)
    budget = torch.minimum((cfg.pred_ratio * (input_ids != cfg.pad_id).sum(1)).round().long(), ok.sum(1))
    if int(budget.min()) < 1:
        raise ValueError("a row has no predictable token (all special or padding), or pred_ratio x its length "
                         "rounds to 0")
    score = torch.rand(B, N, generator=generator, device=generator.device).gather(1, unit)  # one score per unit
    score = torch.where(ok, score, -1.0)  # unpredictable tokens sort first: never predicted
    order = torch.sort(score, dim=1, stable=True).indices  # stable: a unit's tokens stay together, in order
    # whole units: the unit the budget cuts is predicted if half of it fits (or nothing else would be), else visible
    rank = torch.arange(N, device=input_ids.device).expand(B, N)
    cut = (N - budget)[:, None]  # (B, 1) first predicted rank, before rounding to whole units
    sorted_unit = unit.gather(1, order)
    same = (sorted_unit == sorted_unit.gather(1, cut)) & ok.gather(1, order)  # the ranks of the cut unit
    first = torch.where(same, rank, N).amin(1, keepdim=True)
    last = torch.where(same, rank, -1).amax(1, keepdim=True) + 1
    cut = torch.where((last - cut >= cut - first) | (last == N), first, last)  # (a budget of 1 token predicts 1 unit)
    n_pred = N - cut[:, 0]
    # Reshuffle the predicted block token by token, as MPNet does after its whole-word permutation: the unit decides
    # what is hidden, the token order what each prediction sees (so PLM's dependency holds inside a span too).
    P = int(n_pred.max())
    shuffle = torch.rand(B, P, generator=generator, device=generator.device)
    # a two-level sort key: non-predicted ranks keep their order (keys in [0, 1)), predicted ones shuffle in [1, 2)
    key = torch.where(rank >= cut, 1 + shuffle.gather(1, (rank - cut).clamp(0, P - 1)), rank / N)
    return order.gather(1, key.argsort(dim=1, stable=True)), n_pred


def corrupt(targets, cfg, generator, u=None):
    """BERT's 80/10/10 (Devlin et al. arXiv 1810.04805 Sec. 3.1): [MASK], random non-special token, or unchanged.
    u: the uniform draw deciding it, when tokens share one (SpanBERT decides once per span)."""
    if u is None:
        u = torch.rand(targets.shape, generator=generator, device=generator.device)
    normal = predictable(torch.arange(cfg.vocab_size, device=targets.device)[None], cfg)[0].nonzero()[:, 0]
    rand_tok = normal[torch.randint(len(normal), targets.shape, generator=generator, device=generator.device)]
    out = torch.where(u < cfg.mask_prob + cfg.random_prob, rand_tok, targets)
    return torch.where(u < cfg.mask_prob, cfg.mask_id, out)


def span_boundaries(input_ids, is_pred, pred, valid, row_of, cfg):
    """SBO inputs (SpanBERT Sec. 3.2): sbo_left / sbo_right (B, P), the boundaries' encoder rows; sbo_offset, targets.
    A span is a maximal run of predicted positions, so its boundaries are non-predicted, rows that never see predicted
    content (section 4). No term at the row's edge or a special token, nor SBO_MAX_OFFSET or more inside a span."""
    B, N = input_ids.shape
    pos = torch.arange(N, device=input_ids.device).expand(B, N)
    left = torch.where(is_pred, -1, pos).cummax(1).values.gather(1, pred)  # last non-predicted position <= pred
    right = torch.where(is_pred, N, pos).flip(1).cummin(1).values.flip(1).gather(1, pred)  # first one >= pred
    left_c, right_c = left.clamp(min=0), right.clamp(max=N - 1)
    offset = pred - left - 1  # 0 for a span's first token
    ordinary = predictable(input_ids, cfg)
    ok = valid & (left >= 0) & (right < N) & (offset < SBO_MAX_OFFSET) & ordinary.gather(1, left_c) \
        & ordinary.gather(1, right_c)
    targets = torch.where(ok, input_ids.gather(1, pred), IGNORE)
    return dict(sbo_left=row_of.gather(1, left_c), sbo_right=row_of.gather(1, right_c),
                sbo_offset=offset.clamp(0, SBO_MAX_OFFSET - 1), sbo_targets=targets)


def make_batch(input_ids, cfg, generator, word_starts=None, objective=None):
    """The batch of objective "mpnet" | "plm" | "mlm" (default cfg.objective) for (B, N) token ids: "kind", "input_ids",
    "targets" (B, P), "positions" (two-stream) or "pred_positions" (MLM), and the cfg.rtd / cfg.sbo heads' inputs."""
    if objective is not None and objective != cfg.objective:
        cfg = replace(cfg, objective=objective)
        check_config(cfg)  # e.g. mlm + rtd + sbo is refused whatever asked for it
    objective = cfg.objective
    B, N = input_ids.shape
    if N > cfg.max_len:
        raise ValueError(f"a sequence of {N} tokens exceeds max_len={cfg.max_len} of this model")
    unit = masking_units(input_ids, cfg, generator, word_starts)
    order, n_pred = permute(input_ids, unit, cfg, generator)
    P, W = int(n_pred.max()), N - int(n_pred.min())  # predicted block width; non-predicted block width
    pred = order[:, N - P:]  # (B, P) original positions; a row with n_pred < P starts with non-predicted fillers
    valid = torch.arange(P, device=input_ids.device) >= (P - n_pred)[:, None]  # (B, P) real predictions
    is_pred = torch.zeros_like(input_ids, dtype=torch.bool).scatter(1, pred, valid)  # (B, N) in original order
    targets = torch.where(valid, input_ids.gather(1, pred), IGNORE)  # original tokens, never corrupted
    u = torch.rand(B, N, generator=generator, device=generator.device).gather(1, unit.gather(1, pred)) \
        if cfg.masking == "span" else None  # SpanBERT: one 80/10/10 decision per span
    masked = torch.where(valid, corrupt(targets, cfg, generator, u), cfg.pad_id)  # drawn once, shared by both copies
    if objective == "mlm":  # BERT: corrupt in place, natural order
        fed = torch.where(valid, masked, input_ids.gather(1, pred))  # fillers keep their token
        batch = dict(kind="mlm", input_ids=input_ids.scatter(1, pred, fed), pred_positions=pred, targets=targets)
        if (input_ids == cfg.pad_id).any():
            batch["attention_mask"] = (input_ids != cfg.pad_id).long()
        row_of = torch.arange(N, device=input_ids.device).expand(B, N)  # encoder row of each position
    else:
        # Content stream [non-predicted block, W | predicted block, P]: a row predicting n < P tokens has P - n pads at
        # the start of its predicted block and n - min(n_pred) pads at the end of its non-predicted block.
        rank = torch.arange(N, device=input_ids.device).expand(B, N)
        slot = rank + (W + P - N) * (rank >= N - n_pred[:, None])  # (B, N) content slot of each rank
        row_of = torch.empty_like(order).scatter_(1, order, slot)  # (B, N) content slot of each original position
        content = torch.full((B, W + P), cfg.pad_id, dtype=input_ids.dtype, device=input_ids.device)
        content = content.scatter(1, slot, input_ids.gather(1, order))  # permuted sentence, predicted uncorrupted
        positions = torch.zeros_like(content).scatter(1, slot, order)
        if objective == "mpnet":  # [content | mask copies P | query P], positions compensated
            batch = dict(kind="mpnet", input_ids=torch.cat([content, masked, masked], 1),
                         positions=torch.cat([positions, pred, pred], 1), targets=targets)
        else:  # plm, XLNet-style: only the queries, all plain [MASK] (as in MPNet's plm mode)
            batch = dict(kind="plm", input_ids=torch.cat([content, torch.where(valid, cfg.mask_id, cfg.pad_id)], 1),
                         positions=torch.cat([positions, pred], 1), targets=targets)
    if cfg.sbo:
        batch.update(span_boundaries(input_ids, is_pred, pred, valid, row_of, cfg))
    if cfg.rtd:
        batch.update(rtd_inputs(input_ids, batch, is_pred, pred, masked, row_of, W, cfg, generator))
        if objective == "mlm":  # classic ELECTRA: the main model is only the discriminator, with no LM loss
            del batch["targets"], batch["pred_positions"]
    return batch


# ELECTRA's replaced-token detection (Clark et al., arXiv 2003.10555, Sec. 2), two ways:
#   mlm + rtd, classic ELECTRA: the generator fills in the masked positions; the main model (the discriminator) reads
#       the original sentence with those samples, in natural order, labels every real token, and has no LM loss.
#   mpnet + rtd, MPNext's own one-pass design (no paper has it): MPNet's two-stream input, with rtd_ratio of the
#       NON-predicted tokens (disjoint from the predicted ones) replaced by generator samples. One pass gives:
#       rows of the main input      what they hold                        loss
#       non-predicted content       original tokens, some replaced       RTD (binary: replaced or not)
#       predicted content p_k       original tokens                      none (autoregressive keys for the queries)
#       mask copies m_k             80/10/10 corruption                  none (MLM with --return-mlm)
#       query rows q_k              the same                             permuted LM on the ORIGINAL tokens
#       The generator sees only what the non-predicted rows see, else its samples would smuggle predicted content in:
#       predicted tokens as mask copies (mpnet) or hidden (plm). plm + rtd: the same without position compensation.


def replaced_count(cfg, n):
    """R for rows of n tokens: rtd_ratio of the padded length's non-predicted part (as MPNet counts P): fixed shapes."""
    return round(cfg.rtd_ratio * (n - round(cfg.pred_ratio * n)))


def rtd_inputs(input_ids, batch, is_pred, pred, masked, row_of, W, cfg, generator):
    """ELECTRA's inputs: the generator's gen_ids / gen_attention_mask (B, N), natural order; the replaced set as
    rtd_positions (B, R) in gen_ids, rtd_slots (B, R) in the main input, rtd_targets (B, R) (IGNORE at fillers); the
    uniforms rtd_u (B, R) for sampling; rtd_scored: the rows the discriminator labels (width = the rows it reads)."""
    B, N = input_ids.shape
    not_pad = input_ids != cfg.pad_id
    if batch["kind"] == "mlm":  # classic ELECTRA: the generator reads the masked sentence, the main model the original
        out = dict(input_ids=input_ids, gen_ids=batch["input_ids"], gen_attention_mask=not_pad.long(),
                   rtd_positions=pred, rtd_slots=pred, rtd_targets=batch["targets"], rtd_scored=not_pad)
    else:
        cand = predictable(input_ids, cfg) & ~is_pred  # non-predicted ordinary tokens
        R = replaced_count(cfg, N)
        if R < 1:
            raise ValueError(f"rtd_ratio={cfg.rtd_ratio} replaces no token of a {N}-token row; raise it")
        n_rep = (cfg.rtd_ratio * cand.sum(1)).round().long().clamp(max=R)  # (B,) replaced tokens per row
        # R distinct positions per row: the picked candidates first, then unpicked ones as fillers (IGNORE)
        pick = torch.where(cand, torch.rand(B, N, generator=generator, device=generator.device), 2.0).argsort(1)[:, :R]
        rvalid = torch.arange(R, device=input_ids.device) < n_rep[:, None]
        targets = torch.where(rvalid, input_ids.gather(1, pick), IGNORE)
        valid = batch["targets"] != IGNORE
        seen = masked if batch["kind"] == "mpnet" else torch.full_like(masked, cfg.mask_id)  # in predicted slots
        gen_ids = input_ids.scatter(1, pred, torch.where(valid, seen, input_ids.gather(1, pred)))
        corrupted = torch.where(rvalid, corrupt(targets, cfg, generator), gen_ids.gather(1, pick))
        gen_ids = gen_ids.scatter(1, pick, corrupted)
        keys = not_pad & ~is_pred if batch["kind"] == "plm" else not_pad  # PLM's content rows see no predicted slot
        out = dict(gen_ids=gen_ids, gen_attention_mask=keys.long(), rtd_positions=pick,
                   rtd_slots=row_of.gather(1, pick), rtd_targets=targets,
                   rtd_scored=batch["input_ids"][:, :W] != cfg.pad_id)  # the non-predicted block
    out["rtd_u"] = torch.rand(out["rtd_targets"].shape, generator=generator, device=generator.device)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 7. Fine-tuning (MPNet Sec. 3.3, as RoBERTa, arXiv 1907.11692)
#
# Encode `<s> a </s>`, or the pair `<s> a </s></s> b </s>`, in natural order; pool the last layer; ClassificationHead;
# cross-entropy against batch["labels"] (MPNext.loss). The batches come from the caller, with kind "cls".

def pool(h, attention_mask, how="first"):
    """(B, T, D) hidden states -> (B, D): the first row (<s>), or the mean over the non-pad rows."""
    if how == "first":
        return h[:, 0]
    m = attention_mask[..., None].to(h.dtype)  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------------
# 8. Optimizers: a combination lab
#
#   Adam         Kingma & Ba, arXiv 1412.6980 (Alg. 1)        AdamW      Loshchilov & Hutter, arXiv 1711.05101 (Alg. 2)
#   RAdam        Liu et al., arXiv 1908.03265 (Alg. 2)        Lookahead  Zhang et al., arXiv 1907.08610 (Alg. 1)
#   GC           Gradient Centralization, arXiv 2004.01461    AGC        Adaptive Gradient Clipping, arXiv 2102.06171
#   Ranger21     Wright & Demeure, arXiv 2106.13731, bundling Positive-Negative Momentum (arXiv 2103.17182), Stable
#                Weight Decay (arXiv 2011.11152), Norm Loss (arXiv 2103.06583) and a softplus denominator (1908.00700)
#
# One Adam core (adam_moments_, adam_denominator) serves AdamW, RAdam and Ranger21, in torch.optim.AdamW's order:
#   theta <- theta*(1 - lr*lam);  m <- b1*m + (1-b1)*g;  v <- b2*v + (1-b2)*g^2;  t = 1, 2, ...
#   theta <- theta - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

def centralize_gradient_(grad: torch.Tensor, conv_only: bool = False) -> torch.Tensor:
    """GC, in place: g_i <- g_i - mean(g_i) for each output unit i (PyTorch weights are [out, ...], so the paper's
    "column" is our row). Only tensors with ndim > 1, or ndim > 3 with conv_only (the paper's GCC); never biases."""
    if grad.dim() > (3 if conv_only else 1):
        grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))  # the projection (I - 11^T/M) per row
    return grad


def normalize_gradient_(grad: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Ranger21's normalized GC, in place: g <- g / (std(g) + eps) if numel > 2, erasing g's scale (and most of AGC)."""
    if grad.numel() > 2:
        grad.div_(grad.std() + eps)
    return grad


def unit_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit (over dims 1..n-1, keepdim) for ndim >= 2, of the whole tensor for ndim <= 1 (timm's
    convention; Ranger21's own helper differs on 3-D tensors, where it reduces dim 1 only)."""
    return torch.linalg.vector_norm(x, dim=None if x.dim() <= 1 else tuple(range(1, x.dim())), keepdim=x.dim() > 1)


def adaptive_clip_grad_(p: torch.Tensor, clip: float = 0.01, eps: float = 1e-3) -> None:
    """AGC, unit-wise, in place: W*_i = max(||W_i||, eps); if ||G_i|| / W*_i > clip: G_i <- clip * W*_i * G_i/||G_i||.
    Needs unscaled grads under AMP; the paper leaves the final (output) layer unclipped: give it agc_exempt=True."""
    max_norm = unit_norm(p.detach()).clamp(min=eps) * clip  # clip * W*_i
    grad_norm = unit_norm(p.grad).clamp(min=1e-6)
    p.grad.copy_(torch.where(grad_norm > max_norm, p.grad * (max_norm / grad_norm), p.grad))


# gradient switches understood by every optimizer below, per param group (Ranger21 turns gc/norm_gc/agc on)
GRAD_OPTIONS = dict(gc=False, gc_conv_only=False, norm_gc=False, agc=False, agc_clip=0.01, agc_eps=1e-3,
                    agc_exempt=False)


class LabOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer + GRAD_OPTIONS per param group (the output layer's can carry agc_exempt=True), applied at
    the start of step() in Ranger21's order, AGC -> GC -> norm-GC, in place on p.grad (the caller sees it)."""

    def __init__(self, params, defaults: dict, grad_options: dict):
        if set(grad_options) - set(GRAD_OPTIONS):
            raise TypeError(f"unknown gradient options: {sorted(set(grad_options) - set(GRAD_OPTIONS))}")
        super().__init__(params, {**defaults, **GRAD_OPTIONS, **grad_options})

    def prepare_grads(self, group: dict) -> list:
        """Apply the group's gradient switches; return its params that have a gradient."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if group["agc"] and not group["agc_exempt"]:
                adaptive_clip_grad_(p, group["agc_clip"], group["agc_eps"])
            if group["gc"]:
                centralize_gradient_(p.grad, group["gc_conv_only"])
            if group["norm_gc"]:
                normalize_gradient_(p.grad)
        return params

    @staticmethod
    def _closure(closure):
        with torch.enable_grad():
            return None if closure is None else closure()


def adam_state(p: torch.Tensor, state: dict, *extra: str) -> dict:
    """Create Adam's state on first use: the step t (a plain int), m, v and extra zero buffers (PNM, AMSGrad)."""
    if "exp_avg_sq" not in state:
        state["step"] = 0
        for key in ("exp_avg", "exp_avg_sq") + extra:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def adam_moments_(state: dict, grad: torch.Tensor, beta1, beta2: float) -> int:
    """The shared Adam moment update (Adam Alg. 1), in place; returns the new t. beta1=None updates v only
    (Ranger21 needs every v before any update, and computes its first moment, PNM, itself)."""
    state["step"] += 1
    if beta1 is not None:
        state["exp_avg"].lerp_(grad, 1 - beta1)  # m_t = b1*m_{t-1} + (1-b1)*g_t
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t = b2*v_{t-1} + (1-b2)*g_t^2
    return state["step"]


def adam_denominator(v: torch.Tensor, bc2: float, eps: float, softplus_beta=None) -> torch.Tensor:
    """sqrt(v / bc2) + eps (torch adds eps AFTER the bias correction bc2 = 1 - b2^t). Ranger21 then smooths it:
    softplus(x) = log(1 + exp(beta*x)) / beta, ~x for x >> 1/beta but floored at log(2)/beta (0.014 for beta 50)."""
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
    return denom if softplus_beta is None else nn.functional.softplus(denom, beta=softplus_beta)


def weight_decay_(p: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float, decoupled: bool):
    """Decoupled (AdamW Alg. 2): theta <- theta * (1 - lr*lam), with the current (scheduled) lr as torch does;
    coupled (L2): g <- g + lam*theta. Both before the moments, as in torch. Returns the gradient to use."""
    if weight_decay != 0 and decoupled:
        p.mul_(1 - lr * weight_decay)
    elif weight_decay != 0:
        grad = grad.add(p, alpha=weight_decay)
    return grad


class AdamW(LabOptimizer):
    """AdamW from scratch, in torch.optim.AdamW's exact order."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **grad_options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), grad_options)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure(closure)
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in self.prepare_grads(group):
                state = adam_state(p, self.state[p])
                grad = weight_decay_(p, p.grad, lr, group["weight_decay"], decoupled=True)
                t = adam_moments_(state, grad, beta1, beta2)
                denom = adam_denominator(state["exp_avg_sq"], 1 - beta2**t, group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))  # theta -= lr * m_hat / denom
        return loss


class RAdam(LabOptimizer):
    """RAdam (Alg. 2) as torch.optim.RAdam computes it: rectified step while rho_t > 5 (the paper: > 4), else SGD with
    bias-corrected momentum. Weight decay L2, or decoupled (decoupled_weight_decay=True, the paper's experiments).
    degenerated_to_sgd=False, the author's later advice: no update nor decay until rectified (m, v still accumulate)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 degenerated_to_sgd=True, **grad_options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, degenerated_to_sgd=degenerated_to_sgd,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, grad_options)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure(closure)
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            rho_inf = 2 / (1 - beta2) - 1  # maximum length of the approximated SMA
            for p in self.prepare_grads(group):
                state = adam_state(p, self.state[p])
                t = state["step"] + 1
                rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)  # its length at step t
                update = rho_t > 5 or group["degenerated_to_sgd"]
                decay = group["weight_decay"] if update else 0.0
                adam_moments_(state, weight_decay_(p, p.grad, lr, decay, group["decoupled_weight_decay"]), beta1, beta2)
                bc1, bc2 = 1 - beta1**t, 1 - beta2**t
                if rho_t > 5:  # the variance of the adaptive lr is tractable: rectify it
                    r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                    # torch adds eps to the UNcorrected sqrt(v): Adam's denominator with eps' = eps / sqrt(bc2)
                    denom = adam_denominator(state["exp_avg_sq"], bc2, group["eps"] / math.sqrt(bc2))
                    p.addcdiv_(state["exp_avg"], denom, value=-lr * r_t / bc1)  # theta -= lr * r_t * m_hat / denom
                elif update:
                    p.add_(state["exp_avg"], alpha=-lr / bc1)  # theta -= lr * m_hat (SGD with momentum)
        return loss


def lookahead_sync_(p: torch.Tensor, slow: torch.Tensor, alpha: float) -> None:
    """Lookahead Alg. 1, once every k steps: phi <- phi + alpha * (theta - phi); theta <- phi."""
    slow.add_(p - slow, alpha=alpha)
    p.copy_(slow)


class SlowWeights:
    """`with SlowWeights(opt): evaluate()` runs with the Lookahead slow weights phi (where taken yet), then restores."""

    def __init__(self, optimizer):
        self.optimizer, self.fast = optimizer, []

    @torch.no_grad()
    def __enter__(self):
        for p in (p for group in self.optimizer.param_groups for p in group["params"]):
            slow = self.optimizer.state.get(p, {}).get("slow_param")
            if slow is not None:
                self.fast.append((p, p.detach().clone()))
                p.copy_(slow)
        return self.optimizer

    @torch.no_grad()
    def __exit__(self, *exc):
        for p, fast in self.fast:
            p.copy_(fast)
        self.fast = []


class Lookahead(torch.optim.Optimizer):
    """Lookahead around any optimizer. param_groups and defaults ARE the inner one's (Optimizer.__init__ would copy
    them), so schedulers and GradScaler work through it; self.state holds the slow weights phi, group["la_step"] the
    sync counter. phi is taken at the first step(), so weights loaded after construction are not dragged back."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if k < 1 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"need k >= 1 and 0 <= alpha <= 1, got k={k}, alpha={alpha}")
        self.optimizer, self.k, self.alpha, self.state = optimizer, k, alpha, {}

    param_groups = property(lambda self: self.optimizer.param_groups)
    defaults = property(lambda self: self.optimizer.defaults)

    def _params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        for p in self._params():
            if p not in self.state:
                self.state[p] = {"slow_param": p.detach().clone()}  # phi_0 = theta_0
        loss = self.optimizer.step(closure)
        for group in self.param_groups:
            group["la_step"] = group.get("la_step", 0) + 1
            if group["la_step"] % self.k == 0:
                for p in group["params"]:
                    lookahead_sync_(p, self.state[p]["slow_param"], self.alpha)
        return loss

    def slow_weights(self) -> SlowWeights:
        return SlowWeights(self)

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict):
        self.optimizer.add_param_group(param_group)  # its phi is taken at the next step()

    def state_dict(self) -> dict:
        state_dict = self.optimizer.state_dict()  # its param_groups carry la_step
        state_dict["slow_state"] = {i: dict(self.state[p]) for i, p in enumerate(self._params()) if p in self.state}
        return state_dict

    def load_state_dict(self, state_dict: dict):
        state_dict = dict(state_dict)
        slow_state = state_dict.pop("slow_state", {})
        self.optimizer.load_state_dict(state_dict)
        params = self._params()
        self.state = {params[i]: {"slow_param": s["slow_param"].to(params[i].device, params[i].dtype, copy=True)}
                      for i, s in slow_state.items()}

    def __getstate__(self):  # pickle / deepcopy: Optimizer's own versions assume Optimizer.__init__ ran
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)


class Ranger(Lookahead):
    """Ranger (Wright, 2019) = Lookahead(RAdam + GC) with ranger.py's defaults (k=6, alpha=0.5, betas (0.95, 0.999),
    eps 1e-5, decoupled weight decay, rho_t > 5 with the SGD fallback, GC on every grad with ndim > 1)."""

    def __init__(self, params, lr=1e-3, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.0, k=6, alpha=0.5, gc=True,
                 **grad_options):
        inner = RAdam(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True, gc=gc, **grad_options)
        super().__init__(inner, k, alpha)


class Ranger21(LabOptimizer):
    """Ranger21 (arXiv 2106.13731): AdamW + AGC -> GC -> norm-GC, PNM, stable weight decay, norm loss, softplus,
    Lookahead, warmup and warmdown, each a switch (all off: AdamW). Unlike the original code, weight decay and norm
    loss reach every tensor, PNM uses b0 = pnm_momentum_factor, AMSGrad keeps a real max, GC + norm-GC run once. Norm
    loss only where weight_decay > 0; the schedule scales each group's lr without writing it; lookahead counts steps."""

    def __init__(self, params, lr, num_iterations=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, *,
                 use_warmup=True, num_warmup_iterations=None, warmdown_active=True, warmdown_start_pct=0.72,
                 warmdown_min_lr=3e-5, lookahead_active=True, lookahead_k=5, lookahead_alpha=0.5,
                 stable_weight_decay=True, normloss_active=True, normloss_factor=1e-4, pnm=True,
                 pnm_momentum_factor=1.0, amsgrad=True, softplus=True, beta_softplus=50.0,
                 gc=True, norm_gc=True, agc=True, **grad_options):
        if (use_warmup or warmdown_active) and num_iterations is None:
            raise ValueError("Ranger21's warmup/warmdown need num_iterations, the total number of steps")
        if use_warmup and num_warmup_iterations is None:
            num_warmup_iterations = math.ceil(2 / (1 - betas[1]))  # the 2/(1 - b2) rule: 2000 for b2 = 0.999
            if num_warmup_iterations > 0.45 * num_iterations:  # too long for this run: 22% of it (the code's value)
                num_warmup_iterations = max(1, int(0.22 * num_iterations))
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, num_iterations=num_iterations,
                        use_warmup=use_warmup, num_warmup_iterations=num_warmup_iterations,
                        warmdown_active=warmdown_active, warmdown_start_pct=warmdown_start_pct,
                        warmdown_min_lr=warmdown_min_lr, lookahead_active=lookahead_active, lookahead_k=lookahead_k,
                        lookahead_alpha=lookahead_alpha, stable_weight_decay=stable_weight_decay,
                        normloss_active=normloss_active, normloss_factor=normloss_factor, pnm=pnm,
                        pnm_momentum_factor=pnm_momentum_factor, amsgrad=amsgrad, softplus=softplus,
                        beta_softplus=beta_softplus)
        super().__init__(params, defaults, dict(gc=gc, norm_gc=norm_gc, agc=agc, **grad_options))

    @staticmethod
    def scheduled_lr(group: dict, t: int) -> float:
        """lr at step t = 1, 2, ...: warmup lr * min(1, t/W); from S = int(0.72 T) on, warmdown
        lr - (lr - min_lr) * (t + 1 - S) / (T - S + 1), floored at min_lr (the original code's formulas)."""
        lr = group["lr"]
        if group["use_warmup"]:
            lr = lr * min(1.0, t / group["num_warmup_iterations"])
        total, min_lr = group["num_iterations"], group["warmdown_min_lr"]
        start = int(group["warmdown_start_pct"] * total) if group["warmdown_active"] else math.inf
        if t >= start:
            lr = max(min_lr, group["lr"] - (group["lr"] - min_lr) * (t + 1 - start) / (total - start + 1))
        return lr

    def slow_weights(self) -> SlowWeights:
        return SlowWeights(self)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure(closure)
        # phase 1: AGC -> GC -> norm-GC; v_t of every param; the sum of all v_hat for stable weight decay
        work, v_hat_sum, numel = [], 0.0, 0
        for group in self.param_groups:
            beta2 = group["betas"][1]
            extra = [k for k, on in (("neg_exp_avg", group["pnm"]), ("max_exp_avg_sq", group["amsgrad"])) if on]
            for p in self.prepare_grads(group):
                state = adam_state(p, self.state[p], *extra)
                if group["lookahead_active"] and "slow_param" not in state:
                    state["slow_param"] = p.detach().clone()  # phi_0 = theta_0
                t = adam_moments_(state, p.grad, None, beta2)
                v_hat_sum = v_hat_sum + state["exp_avg_sq"].sum() / (1 - beta2**t)
                numel += p.numel()
                work.append((group, p, state, t))
        if not work:
            return loss
        # stable weight decay divides the decoupled decay by sqrt(mean v_hat) over ALL params (1 while v is all 0)
        v_scale = torch.sqrt(v_hat_sum / numel)
        v_scale = torch.where(v_scale > 0, v_scale, torch.ones_like(v_scale))
        # phase 2: regularizers, first moment, update, lookahead
        for group, p, state, t in work:
            (beta1, beta2), wd, lr = group["betas"], group["weight_decay"], self.scheduled_lr(group, t)
            if wd != 0:
                p.mul_(1 - lr * wd / v_scale if group["stable_weight_decay"] else 1 - lr * wd)
                if group["normloss_active"]:  # norm loss f*(||w_i|| - 1)^2 per row, gradient 2f(1 - 1/||w_i||) w_i
                    p.mul_(1 - lr * 2 * group["normloss_factor"] * (1 - 1 / (unit_norm(p) + group["eps"])))
            if group["pnm"]:
                # PNM: two momenta take turns, each updated every other step with b1^2 (so 1 - b1^t still corrects
                # the bias); direction ((1 + b0) m_now - b0 m_other) / sqrt((1 + b0)^2 + b0^2) keeps the noise scale
                now, other = state["exp_avg"], state["neg_exp_avg"]
                now, other = (now, other) if t % 2 == 1 else (other, now)
                now.mul_(beta1**2).add_(p.grad, alpha=1 - beta1**2)
                b0 = group["pnm_momentum_factor"]
                m = now.mul(1 + b0).add_(other, alpha=-b0).div_(math.sqrt((1 + b0) ** 2 + b0**2))
            else:
                m = state["exp_avg"].lerp_(p.grad, 1 - beta1)  # m_t = b1*m_{t-1} + (1-b1)*g_t
            v = state["exp_avg_sq"]
            if group["amsgrad"]:
                v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])  # v_max = max(v_max, v)
            softplus_beta = group["beta_softplus"] if group["softplus"] else None
            p.addcdiv_(m, adam_denominator(v, 1 - beta2**t, group["eps"], softplus_beta), value=-lr / (1 - beta1**t))
            if group["lookahead_active"] and t % group["lookahead_k"] == 0:
                lookahead_sync_(p, state["slow_param"], group["lookahead_alpha"])
        return loss


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas=(0.9, 0.98), eps=1e-6,
                    lookahead=False, gc=False, num_iterations=None, output_layer_names=()) -> torch.optim.Optimizer:
    """The optimizer for train.py. Weight decay only on non-embedding params with ndim >= 2, and GC never without it
    (embedding rows are not the CNN "weight vectors" of GC's evidence); output_layer_names skip AGC. lookahead=True
    wraps adamw/radam; Ranger21's own warmup/warmdown need num_iterations and stack with any outside schedule."""
    named = {n: list(m.parameters()) for n, m in model.named_modules() if n}  # a module name, or ...
    named.update((n, [p]) for n, p in model.named_parameters())  # ... a parameter name (e.g. a bare output bias)
    if any(n not in named for n in output_layer_names):
        raise ValueError(f"unknown module/parameter name in output_layer_names={output_layer_names}")
    exempt = {id(p) for n in output_layer_names for p in named[n]}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {}
    for p in model.parameters():  # each tensor once, tied weights included
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2 and id(p) not in embeddings, id(p) in exempt), []).append(p)
    param_groups = []  # decay groups first; the AGC-exempt output layer in groups of its own
    for (decay, agc_exempt), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        param_groups.append(dict(params=params, weight_decay=weight_decay if decay else 0.0, agc_exempt=agc_exempt))
        if not decay:
            param_groups[-1]["gc"] = False
    grad_options = dict(gc=True) if gc else {}
    if name == "adamw":
        optimizer = AdamW(param_groups, lr, betas, eps, weight_decay, **grad_options)
    elif name == "radam":
        optimizer = RAdam(param_groups, lr, betas, eps, weight_decay, decoupled_weight_decay=True, **grad_options)
    elif name == "ranger":
        return Ranger(param_groups, lr, betas, eps, weight_decay)
    elif name == "ranger21":
        return Ranger21(param_groups, lr, num_iterations, betas, eps, weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(CHOICES['optimizer'])}")
    return Lookahead(optimizer) if lookahead else optimizer


# ----------------------------------------------------------------------------------------------------------------------
# 9. Learning-rate schedules

def lr_multiplier(step, warmup_steps, total_steps, decay="linear", min_ratio=0.0):
    """Multiplier of the peak learning rate at `step` (0-based): linear warmup that starts above zero, then linear
    decay to min_ratio at total_steps (MPNet/fairseq polynomial_decay with power 1) or half a cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
