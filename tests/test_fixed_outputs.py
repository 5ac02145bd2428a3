"""The report's outputs stay byte-identical on a FIXED MLflow store: a guard for refactors that move the report code.

`store` logs, without training, finished runs as the trainer and a campaign's cells tag them (params, env.*
tags, compare.* tags under a parent run, final metrics and per-epoch histories from a seeded generator, fixed
start times): (a) a report group, 2 datasets x plain, rifle, dropout, rifle+dropout x 3 seeds, validated;
(b) the regime view's grid, plain and rifle-K{1,2}-{follow,cyclic} x 2 data sizes x 2 protocols x 3 seeds; (c) a
campaign, 2 datasets x 2 protocols x plain, rifle x 3 seeds. Nothing in the outputs names a run id or a time.

The store is built without the report code. The three `render_*` functions are its only callers, each returning
{file name: its text, or "sha256:..." of a figure's pixels}: a refactor that moves these APIs re-points them,
and what they return must still match the files under tests/data/fixed_outputs/<report|regime|campaign>/: the
tables and Markdown byte for byte (CSV as pandas writes it), every figure by the SHA-256 of its RGBA pixels
(figures.json; compared only under the matplotlib and FreeType that recorded them, since others draw other
pixels). RIFLE_RECORD=1 rewrites the files from the current code (as tests/test_recorded.py does): only when an
output is meant to change.
"""
import csv
import hashlib
import io
import json
import math
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

RECORDED = Path(__file__).parent / "data" / "fixed_outputs"
FIGURES = RECORDED / "figures.json"
T0 = 1_700_000_000_000  # ms; run i starts at T0 + i minutes: no ordering depends on the clock
EPOCHS, CLASSES, BLOCKS = 12, 10, ("conv_stem", "blocks.0", "blocks.1")
ENV = {"env.torch": "2.5.1", "env.torchvision": "0.20.1", "env.timm": "1.0.12", "env.pillow": "11.0.0",
       "env.cuda": "none", "env.device": "Test CPU (AVX2)", "env.threads": "1", "env.deterministic": "false",
       "env.datasets": "3.1.0", "env.numpy": "2.1.3", "env.accelerate": "1.1.1", "env.mlflow": "2.18.0",
       "env.optuna": "4.1.0"}
PROTOCOLS = {"validated": {"val_fraction": 0.2, "selection": "best_val"},
             "authors": {"val_fraction": 0.0, "selection": "last"}}
# What every run logs besides its dataset, method, seed and protocol (rifle.trainer.run_params, abridged)
SHARED = {"model": "efficientnet_lite0", "pretrained": True, "weights": "none", "image_size": 48,
          "train_per_class": 10, "split_seed": 0, "epochs": EPOCHS, "batch_size": 32, "lr": 0.01, "head_lr": 0.01,
          "momentum": 0.9, "weight_decay": 0.0001, "grad_accum_steps": 1, "mixed_precision": "no",
          "reinit_times": 1, "head_lr_policy": "follow", "dropout_p": 0.5, "num_workers": 0, "threads": 1,
          "deterministic": False, "channels_last": True, "probe_reinit_steps": 5, "clr_cycles": 0,
          "experiment": "rifle", "weights_resolved": "efficientnet_lite0 (bundled ImageNet weights)"}


class Store:
    """A sqlite MLflow store filled with finished runs, as the trainer and the campaign's cells log them."""

    def __init__(self, folder: Path):
        from mlflow.tracking import MlflowClient
        self.uri, self.folder = f"sqlite:///{folder}/mlflow.db", folder
        self.client, self.rng, self.runs = MlflowClient(self.uri), np.random.default_rng(2020), 0
        self.groups: dict[str, tuple] = {}  # parent run -> (experiment id, group, campaign)

    def _start(self, exp_id: str, name: str, tags: dict) -> tuple[str, int]:
        self.runs += 1
        start = T0 + 60_000 * self.runs
        return self.client.create_run(exp_id, start_time=start, tags=tags, run_name=name).info.run_id, start

    def parent(self, experiment: str, group: str, campaign: str) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=str(self.folder / "artifacts"))
        run, start = self._start(exp_id, group, {"compare.name": group, "compare.role": "parent",
                                                 "campaign.name": campaign})
        self.client.set_terminated(run, end_time=start + 1000)
        self.groups[run] = (exp_id, group, campaign)
        return run

    def cell(self, parent: str, method: str, seed: int, options: dict, test_acc: float) -> None:
        """One finished cell run: params, tags, per-epoch history and final metrics (rifle.trainer.fit)."""
        from mlflow.entities import Metric, Param
        exp_id, group, campaign = self.groups[parent]
        p = SHARED | {"seed": seed} | options
        tricks = [t for t in str(p.get("tricks", "")).split(",") if t]
        period = p["epochs"] // (p["reinit_times"] + 1)
        boundaries = [e for e in range(p["epochs"] - 1) if (e + 1) % period == 0]  # schedules.period_boundaries
        reinits = boundaries if "rifle" in tricks else []
        train = CLASSES * p["train_per_class"]  # the k-shot subset is drawn after validation is carved out
        p |= {"tricks": ",".join(tricks) or "none", "reinit_count": len(reinits), "epochs_trained": p["epochs"],
              "optimizer_steps": p["epochs"] * math.ceil(train / p["batch_size"])}
        history = self.history(p, reinits, boundaries, validated=p["val_fraction"] > 0)
        final = {"test_acc_last": test_acc if p["selection"] == "last" else self.accuracy(test_acc - 0.004, 0.006)}
        selected = EPOCHS - 1
        if "val_acc" in history:
            best = int(np.argmax(history["val_acc"]))
            final |= {"best_val_acc": history["val_acc"][best], "best_epoch": best}
            selected = best if p["selection"] == "best_val" else selected
        final |= {"test_acc": test_acc, "selected_epoch": selected}
        tags = {"mlflow.parentRunId": parent, "compare.name": group, "compare.role": "seed", "compare.method": method,
                "compare.seed": str(seed), "campaign.name": campaign, "campaign.cell": f"{group}/{method}/seed-{seed}",
                "campaign.optuna_trials": str(self.runs), "campaign.state": "complete", "tricks": p["tricks"],
                "num_processes": "1", "git_commit": "0" * 40, "git_dirty": "false",
                "dataset_fingerprint": f"{p['dataset']}-{p['train_per_class']}pc", **ENV}
        if reinits:  # the trainer's test_and_log
            tags["selected_before_reinit"] = str(selected <= reinits[0]).lower()
        run, start = self._start(exp_id, f"{method}-seed-{seed}", tags)
        points = [Metric(key, float(v), start + 1000 * (step + 1), step) for key, values in history.items()
                  for step, v in enumerate(values) if v is not None]
        points += [Metric(key, float(v), start + 1000 * (EPOCHS + 1), 0) for key, v in final.items()]
        assert len(points) <= 1000 and len(p) <= 100  # one log_batch
        self.client.log_batch(run, metrics=points, params=[Param(name, str(v)) for name, v in p.items()])
        self.client.set_terminated(run, end_time=start + 1000 * (EPOCHS + 2))

    def accuracy(self, mean: float, sd: float) -> float:
        return round(float(np.clip(mean + self.rng.normal(0, sd), 0, 1)) * 500) / 500  # 500 test images

    def history(self, p: dict, reinits: list[int], boundaries: list[int], validated: bool) -> dict[str, list]:
        """Per-epoch curves: accuracy rising (falling back after each re-init), cosine learning rates, the
        probes' distances and gradient norms per block, and the gradient windows around each period boundary."""
        r, t = self.rng, (np.arange(EPOCHS) + 1) / EPOCHS
        lr = 0.5 * p["lr"] * (1 + np.cos(np.pi * np.arange(EPOCHS) / EPOCHS))
        period = EPOCHS // (p["reinit_times"] + 1)
        cyclic = 0.5 * p["head_lr"] * (1 + np.cos(np.pi * (np.arange(EPOCHS) % period) / period))
        since = np.array([min([e - b for b in reinits if e > b], default=99) for e in range(EPOCHS)])
        dip = 0.2 * np.exp(-(since - 1) / 1.5) * (since < 99)
        train_acc = np.clip(0.95 - 0.6 * np.exp(-4 * t) - dip + r.normal(0, 0.01, EPOCHS), 0, 1)
        out = {"train_loss": list(np.round(-np.log(train_acc + 0.02) + r.normal(0, 0.02, EPOCHS), 4)),
               "train_acc": list(np.round(train_acc, 4)), "lr_backbone": list(lr),
               "lr_head": list(cyclic if reinits and p["head_lr_policy"] == "cyclic" else lr)}
        if validated:
            out["val_acc"] = list(np.round(np.clip(train_acc - 0.06 + r.normal(0, 0.02, EPOCHS), 0, 1) * 20) / 20)
        if reinits:
            out["head_reinit"] = [float(e in reinits) for e in range(EPOCHS)]
        boost = 1.4 if reinits else 1.0
        for i, block in enumerate(BLOCKS):
            scale = 0.2 * (i + 1)
            out[f"weight_dist/{block}"] = list(np.round(scale * boost * np.sqrt(t) * r.uniform(0.9, 1.1), 5))
            grad = scale * np.exp(-2 * t) * (1 + 2 * dip) * r.uniform(0.8, 1.2, EPOCHS)
            out[f"grad_norm/{block}"] = list(np.round(grad, 5))
            pre = [round(float(grad[e] * r.uniform(0.8, 1.0)), 5) if e in boundaries else None for e in range(EPOCHS)]
            jump = 3.0 if reinits else 1.1
            post = [round(float(grad[e] * jump * r.uniform(0.8, 1.2)), 5) if e - 1 in boundaries else None
                    for e in range(EPOCHS)]
            out[f"grad_norm_pre_reinit/{block}"], out[f"grad_norm_post_reinit/{block}"] = pre, post
        return out


def unsynced(dbapi_connection, _record):
    """A throwaway store need not survive a power cut: sqlite commits without waiting for the disk (3x faster)."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA synchronous=OFF")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    event.listen(Engine, "connect", unsynced)
    try:
        return fill(Store(tmp_path_factory.mktemp("fixed-store")))
    finally:
        event.remove(Engine, "connect", unsynced)


def fill(s: Store) -> SimpleNamespace:
    seeds = range(3)
    # (a) one report group: 2 datasets x 4 methods x 3 seeds, validated; methods with dropout tuned to another lr
    # on cub (a "settings differ between methods" note)
    report = s.parent("rifle-study", "table-validated", "table")
    effects = {"plain": 0.0, "rifle": 0.02, "dropout": 0.006, "rifle+dropout": 0.024}
    for dataset, base in (("digits", 0.86), ("imagefolder:/data/cub", 0.62)):
        offsets = [s.rng.normal(0, 0.015) for _ in seeds]
        for seed in seeds:
            for method, effect in effects.items():
                lr = {"lr": 0.02} if "dropout" in method and dataset != "digits" else {}
                tricks = "" if method == "plain" else method.replace("+", ",")
                s.cell(report, method, seed, {"dataset": dataset, "tricks": tricks} | lr | PROTOCOLS["validated"],
                       s.accuracy(base + offsets[seed] + effect, 0.006))
    # (b) the regime view's grid (its group names and variants): a clear gain (K1-follow), a clear loss (K2-cyclic)
    # and noise
    variants = {"plain": {"tricks": ""}} | {f"rifle-K{k}-{policy}": {"tricks": "rifle", "reinit_times": k,
                                                                     "head_lr_policy": policy}
                                            for k in (1, 2) for policy in ("follow", "cyclic")}
    effects = {"rifle-K1-follow": (0.03, 0.002), "rifle-K1-cyclic": (0.01, 0.01), "rifle-K2-follow": (0.0, 0.01),
               "rifle-K2-cyclic": (-0.03, 0.002)}
    regime_parents, plan = {}, {}
    for protocol, evaluation in PROTOCOLS.items():
        for per_class in (10, 30):
            group = f"regime-{protocol}-{per_class}pc"
            shared = {"dataset": "digits", "epochs": EPOCHS, "batch_size": 32, "train_per_class": per_class} \
                | evaluation
            plan[group] = {label: shared | options for label, options in variants.items()}
            regime_parents[(protocol, per_class)] = parent = s.parent("rifle-regime", group, "regime")
            for seed in seeds:
                plain = 0.7 + 0.005 * per_class + s.rng.normal(0, 0.01)
                for label, options in plan[group].items():
                    effect, sd = effects.get(label, (0.0, 0.0))
                    s.cell(parent, label, seed, options, s.accuracy(plain + effect, sd))
    # (c) a campaign: 2 datasets x 2 protocols x plain, rifle x 3 seeds (groups <name>-<dataset>-<protocol>)
    campaign = {}
    for protocol, evaluation in PROTOCOLS.items():
        for dataset, slug, base in (("digits", "digits", 0.9), ("imagefolder:/data/cub", "imagefolder_cub", 0.55)):
            group = f"table1-{slug}-{protocol}"
            campaign[group] = (dataset, protocol, parent := s.parent("rifle-campaign", group, "table1"))
            for seed in seeds:
                acc = base + s.rng.normal(0, 0.02)
                for method, tricks, effect in (("plain", "", 0.0), ("rifle", "rifle", 0.015)):
                    s.cell(parent, method, seed, {"dataset": dataset, "tricks": tricks} | evaluation,
                           s.accuracy(acc + effect, 0.005))
    return SimpleNamespace(uri=s.uri, report=report, regime_parents=regime_parents, regime_plan=plan,
                           campaign=campaign)


# ------------------------------------------------------------ the renderers: re-point these after a refactor

def render_report(uri: str, parent: str, folder: Path) -> dict[str, str]:
    """Every file rifle.report writes for a parent run's children: tables as text (runs.csv without the run ids
    and start times), figures as pixel hashes."""
    from rifle.evidence.build import build_report
    build_report(uri, parent_run_id=parent, output_dir=folder, log=False)
    out = {f.name: png_pixels(f.read_bytes()) if f.suffix == ".png" else f.read_bytes().decode()
           for f in sorted(folder.iterdir())}
    out["runs.csv"] = drop_columns(out["runs.csv"], ("run_id", "start_time"))
    return out


def render_regime(uri: str, parents: dict, plan: dict) -> dict[str, str]:
    """regime.md, regime.csv and regime.png as the regime plan's view writes them: its groups' parent runs in
    the plan's order, its methods in the plan's order."""
    from rifle.evidence import regime
    table = regime.collect(uri, list(parents.values()), list(next(iter(plan.values()))))
    return {"regime.md": regime.markdown(table), "regime.csv": table.to_csv(index=False),
            "regime.png": figure_pixels(regime.plot(table))}


def render_campaign_summary(uri: str, groups: dict) -> dict[str, str]:
    """summary.md, summary.csv and summary_paired.csv of a campaign (rifle campaign's write_reports): `groups`,
    group -> (dataset, protocol, parent run), in the campaign's order."""
    import pandas as pd

    from rifle.evidence.tables import campaign_summary as summary_tables
    from rifle.track.reads import fetch_runs
    by_protocol: dict[str, list] = {}
    for dataset, protocol, parent in groups.values():
        by_protocol.setdefault(protocol, []).append(fetch_runs(uri, parent_run_id=parent))
    text, table, tests = summary_tables({p: pd.concat(r, ignore_index=True) for p, r in by_protocol.items()},
                                        "rifle")
    return {"summary.md": text, "summary.csv": table.to_csv(index=False),
            "summary_paired.csv": tests.to_csv(index=False)}


RENDER = {"report": lambda s, folder: render_report(s.uri, s.report, folder),
          "regime": lambda s, folder: render_regime(s.uri, s.regime_parents, s.regime_plan),
          "campaign": lambda s, folder: render_campaign_summary(s.uri, s.campaign)}


# ------------------------------------------------------------------------------------------------- helpers

def png_pixels(png: bytes) -> str:
    """SHA-256 of a PNG's decoded RGBA pixels (with its size): what it shows, not how it was compressed."""
    from PIL import Image
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    return "sha256:" + hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


def figure_pixels(fig, dpi: int = 110) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)  # as the tools save their figures
    return png_pixels(buffer.getvalue())


def drop_columns(text: str, columns: tuple[str, ...]) -> str:
    """CSV text (as pandas writes it, through the csv module) without `columns`, every other byte kept."""
    rows = list(csv.reader(io.StringIO(text, newline="")))
    keep = [i for i, name in enumerate(rows[0]) if name not in columns]
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows([[row[i] for i in keep] for row in rows])
    return out.getvalue()


def drawing_library() -> dict[str, str]:
    import matplotlib
    from matplotlib import ft2font
    return {"matplotlib": matplotlib.__version__, "freetype": ft2font.__freetype_version__}


@pytest.mark.slow  # ~20 s: the store, torch (the report orders blocks by the model) and ten figures
@pytest.mark.parametrize("name", list(RENDER))
def test_outputs_match_the_recorded_ones(store, tmp_path, name):
    got = RENDER[name](store, tmp_path / name)
    texts = {k: v for k, v in got.items() if not k.endswith(".png")}
    pixels = {f"{name}/{k}": v for k, v in got.items() if k.endswith(".png")}
    folder = RECORDED / name
    if os.environ.get("RIFLE_RECORD"):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            stale.unlink()
        for file, text in texts.items():
            (folder / file).write_bytes(text.encode())
        figures = json.loads(FIGURES.read_text())["figures"] if FIGURES.exists() else {}
        figures = {k: v for k, v in figures.items() if not k.startswith(f"{name}/")} | pixels
        FIGURES.write_text(json.dumps(drawing_library() | {"figures": dict(sorted(figures.items()))}, indent=1) + "\n")
        pytest.skip(f"recorded {len(texts)} files and {len(pixels)} figures in {folder}")
    assert sorted(texts) == sorted(f.name for f in folder.iterdir()), "the files written changed"
    for file, text in texts.items():
        assert text == (folder / file).read_bytes().decode(), f"{name}/{file} differs from the recorded one"
    recorded = json.loads(FIGURES.read_text())
    want = {k: v for k, v in recorded["figures"].items() if k.startswith(f"{name}/")}
    assert sorted(pixels) == sorted(want), "the figures drawn changed"
    library = {k: recorded[k] for k in drawing_library()}
    if library != drawing_library():
        pytest.skip(f"figure pixels were recorded with {library}, this is {drawing_library()}: tables compared only")
    assert pixels == want, "a figure's pixels changed"
