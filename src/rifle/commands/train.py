"""`rifle train [--config file.yaml] [--<option> value ...]`: one fine-tuning run.

Every option of rifle.config has a flag of the same name; the same command with the same --output_dir
resumes an interrupted run. Works as is under `accelerate launch` and `mlflow run`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .. import config as C
from .options import add_options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rifle train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Fine-tune an ImageNet-pretrained CNN with RIFLE and/or a baseline; "
                                "tracked in MLflow.")
    p.add_argument("--config", help="YAML file of options (flat, or under data/model/optim/tricks/run)")
    for section, cls in C.SECTIONS.items():
        add_options(p.add_argument_group(section), dataclasses.fields(cls))
    extra = [f for _, f in C.catalog.OPTIONS.values()]  # options of tricks registered from outside
    if extra:
        add_options(p.add_argument_group("registered tricks"), extra)
    return p


def parse(argv: list[str] | None = None) -> C.Config:
    args = vars(parser().parse_args(argv))
    # An empty value means "not given" (e.g. `mlflow run -P lr=`), except for --tricks, where empty means
    # plain fine-tuning.
    args = {k: v for k, v in args.items() if v != "" or k == "tricks"}
    config_file = args.pop("config", None)
    cfg = C.build(args, config_file)
    from ..models import check_model_spec
    try:  # the model and its weights exist (registries only: nothing loads yet)
        check_model_spec(cfg.model.model, cfg.model.weights, cfg.model.pretrained)
    except ValueError as e:  # "--model: ..." or "--weights: ..."
        option, _, message = str(e).removeprefix("--").partition(": ")
        raise C.ConfigError(option, message) from None
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
        from ..trainer import fit
        result = fit(cfg)
    except C.ConfigError as e:
        print(f"rifle train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM while the run is open (rifle.tracking.Terminated)
        from ..track.signals import Terminated
        print(f"rifle train: stopped by {'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'}; an open MLflow "
              "run is marked KILLED, and the same command resumes from the last checkpoint", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        from ..data import DataError
        from ..network import Unreachable
        from ..track.tracker import TrackingLost
        from ..trainer import NonFiniteLoss
        if isinstance(e, (DataError, Unreachable)):
            print(f"rifle train: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, TrackingLost):  # EX_TEMPFAIL: nothing is wrong with the run; try again later
            print(f"rifle train: error: {e}", file=sys.stderr)
            return 75
        if isinstance(e, NonFiniteLoss):  # diverged: not bad input, so another exit code
            print(f"rifle train: error: {e}", file=sys.stderr)
            return 3
        raise
    if result.get("run_id"):  # only the main process has one
        from ..trainer import result_line
        print(result_line(cfg, result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
