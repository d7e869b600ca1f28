"""
Use a trained run: lab.use.load_run(DIR) in Python; python -m lab fill --init DIR "text with <mask>"; python -m lab
export --init DIR OUT for Hugging Face transformers.
"""

import sys

import torch

import data
import mpnext
import train
from lab import ShowDefaults


def load_run(out_dir, device="cpu", ckpt=None):
    """(model in eval mode, tokenizer) of a pre-training or fine-tuning --out-dir: the one call that uses a run.
        model, tok = load_run("out")
        logits = model(torch.tensor([[tok.bos_id] + tok.encode("the <mask> sat", specials=True) + [tok.eos_id]]))"""
    ckpt = ckpt or data.read_run(out_dir)  # (a caller that has read it already passes it)
    model = mpnext.MPNext(mpnext.MPNextConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), data.load_tokenizer(out_dir)


def export(argv=None):
    """A run's model and tokenizer as a Hugging Face checkpoint: pipeline("fill-mask", model=OUT) works, or for a
    fine-tuned run pipeline("text-classification", model=OUT)."""
    p = train.OneLineParser(prog="python -m lab export", formatter_class=ShowDefaults,
                            description="Write a run as an HF checkpoint with its tokenizer.")
    p.add_argument("--init", required=True, help="a run's --out-dir")
    p.add_argument("out", help="the directory to write")
    args = p.parse_args(argv)
    data.check_export_dir(args.init, args.out)
    ckpt = data.read_run(args.init)  # once: the weights and a fine-tuned run's label names
    model, tok = load_run(args.init, ckpt=ckpt)
    data.export_hf(model, tok, args.out, ckpt.get("labels"))
    return None, 0


def fill(argv=None):
    """Print the top-k tokens for each <mask> of each text. A mask stands for ONE token (a word piece)."""
    p = train.OneLineParser(prog="python -m lab fill", formatter_class=ShowDefaults,
                            description="Top-k completions for each <mask> (one token each).")
    p.add_argument("--init", required=True, help="a run's --out-dir")
    p.add_argument("--top-k", type=int, default=5, help="completions per <mask> (at least 1)")
    p.add_argument("--device", default="cpu", choices=train.CHOICES["device"])
    p.add_argument("--dtype", default="auto", choices=train.CHOICES["dtype"], help="auto: bf16 where native")
    p.add_argument("text", nargs="+", help='e.g. "The <mask> of the module."')
    args = p.parse_args(argv)
    train.check_ranges(args, {"top_k": train.AT_LEAST_1})
    device = train.pick_device(args.device)
    autocast = train.autocast_for(device, train.pick_dtype(args.dtype, device))
    model, tok = load_run(args.init, device)
    lm = model.generator if mpnext.is_electra(model.cfg) else model  # classic ELECTRA: its generator fills in
    if model.cfg.n_classes:
        print(f"warning: {args.init} is a fine-tuned classifier: its LM head was not trained with the fine-tuned "
              f"encoder, so these guesses mean little; fill in with the pre-training run", file=sys.stderr)
    results = []
    for text in args.text:
        ids = [tok.bos_id] + tok.encode(text.replace("[MASK]", "<mask>"), specials=True) + [tok.eos_id]  # (BERT's)
        where = [i for i, t in enumerate(ids) if t == tok.mask_id]
        if not where:
            raise ValueError(f"{text!r}: no blank in it; write each blank as <mask> (one token each)")
        if len(ids) > model.cfg.max_len:
            raise ValueError(f"{text!r}: {len(ids)} tokens, more than the model's {model.cfg.max_len}; shorten it")
        with torch.no_grad(), autocast:
            probs = lm(torch.tensor([ids], device=device)).float().softmax(-1)[0, where].cpu()  # (masks, V)
        top = probs.topk(min(args.top_k, probs.shape[-1]))
        results.append([[(tok.decode([j]), pr) for pr, j in zip(ps.tolist(), js.tolist())]
                        for ps, js in zip(top.values, top.indices)])
        print(text)
        for n, options in enumerate(results[-1], 1):
            print(f"  <mask> {n}: " + " | ".join(f"{piece.strip() or repr(piece)} {pr:.3f}" for piece, pr in options))
    return results, 0
