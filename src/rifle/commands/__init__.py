"""The `rifle` command: one program with a verb per task, as `mlflow`, `accelerate` and `optuna` have.

`python -m rifle VERB ...` is the same where the console script is not on PATH. Every verb takes its options as
`--name value`, trainer options included (`rifle campaign --epochs 40`). The command modules live here, apart
from the library, which never imports them.
"""
from __future__ import annotations

import importlib
import sys

# verb -> what it does (the module rifle.commands.<verb> has main(argv) -> exit code)
VERBS = {
    "train": "fine-tune one ImageNet-pretrained model with RIFLE and/or a baseline, tracked in MLflow",
    "sweep": "an Optuna study over one method's search space (start it again for more workers)",
    "campaign": "a plan's paired cells: groups x methods x seeds x protocols, on one worker or many; --status",
    "compare": "re-train each tuned study's best settings on the same paired seeds",
    "report": "tables and figures from finished MLflow runs (per group, or a campaign's views)",
    "preflight": "check a campaign's plan and price it on this machine before it spends",
}


def usage() -> str:
    width = max(map(len, VERBS))
    return ("usage: rifle VERB [options]   (python -m rifle VERB ...)\n\nRIFLE and its baselines for deep "
            "transfer learning: Accelerate, MLflow, Optuna.\n\nverbs:\n"
            + "\n".join(f"  {verb:<{width}}  {text}" for verb, text in VERBS.items())
            + "\n\n`rifle VERB --help` lists a verb's options.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"rifle: error: unknown verb {verb!r} (verbs: {', '.join(VERBS)}); `rifle --help` says what each does",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"{__name__}.{verb}").main(rest)
