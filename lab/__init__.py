"""
The MPNext lab: everything beyond pre-training, run as `python -m lab <command>` (lab/README.md is its guide).
It builds on train.py, mpnext.py and data.py; none of them imports the lab.
"""

import argparse
import importlib
import sys

COMMANDS = {  # name: (module, what it does, what a Ctrl-C keeps)
    "finetune": ("lab.finetune", "fine-tune a run (or an HF MPNet) on a classification task, or --probe its features",
                 "a fine-tuning keeps its best epoch so far in --out-dir; a probe keeps nothing"),
    "compare": ("lab.compare", "pre-train a grid of recipes on one budget, then probe / fine-tune each over seeds",
                "results.csv keeps every finished row: run the same command again to go on"),
    "bench": ("lab.bench", "time one training step of each objective and head, beside HF's MPNetForMaskedLM",
              "nothing to keep"),
    "fill": ("lab.use", "print the top-k tokens for each <mask> of a text", "nothing to keep"),
    "export": ("lab.use", "write a run as a Hugging Face checkpoint with its tokenizer",
               "the export directory may be incomplete: export again"),
}
USAGE = "usage: python -m lab <command> [flags]   (python -m lab <command> --help lists its flags)\n\ncommands:\n" + \
    "\n".join(f"  {name:<9} {what}" for name, (_, what, _) in COMMANDS.items()) + \
    "\n\nPre-training itself is python train.py (python train.py --help)."


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help with "(default: X)" after each flag that has one (not after empty or off ones)."""

    def _get_help_string(self, action):
        return action.help if action.default in ("", None, False) else super()._get_help_string(action)


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
    except KeyboardInterrupt:  # in any phase that has no Ctrl-C handling of its own
        print(f"\nstopped (Ctrl-C): {COMMANDS[argv[0]][2]}", file=sys.stderr)
        return 130
