"""
The MPNext lab: everything beyond pre-training, run as `python -m lab <command>` (lab/README.md is its guide).
It builds on train.py, mpnext.py and data.py; none of them imports the lab.
"""

import importlib
import sys

COMMANDS = {  # name: (module, what it does)
    "finetune": ("lab.finetune", "fine-tune a run (or an HF MPNet) on a classification task, or --probe its features"),
    "compare": ("lab.compare", "pre-train a grid of recipes on one budget, then probe / fine-tune each over seeds"),
    "bench": ("lab.bench", "time one training step of each objective and head, beside HF's MPNetForMaskedLM"),
    "fill": ("lab.use", "print the top-k tokens for each <mask> of a text"),
    "export": ("lab.use", "write a run as a Hugging Face checkpoint with its tokenizer"),
}
USAGE = "usage: python -m lab <command> [flags]   (python -m lab <command> --help lists its flags)\n\ncommands:\n" + \
    "\n".join(f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items()) + \
    "\n\nPre-training itself is python train.py (python train.py --help)."


def main(argv=None):
    """Runs one command; returns its exit status (2 and one line for a user's mistake)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"error: {what}; one of {', '.join(COMMANDS)} (python -m lab --help)", file=sys.stderr)
        return 2
    import train  # (after the usage checks: --help answers without loading torch)
    if train.torchrun():
        print(f"error: python -m lab {argv[0]} runs in one process; start it with python, not torchrun",
              file=sys.stderr)
        return 2
    command = getattr(importlib.import_module(COMMANDS[argv[0]][0]), argv[0])
    try:
        return command(argv[1:])[1]
    except ValueError as e:  # user mistakes (data.DataError is one too): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
