"""Atomic epoch checkpoints: `<output_dir>/checkpoints/epoch-NNNN/` holds model.safetensors, optimizer.pt
(tensors only, loaded with weights_only=True) and state.json (counters, best record, history, trick states,
MLflow run id). A directory gets its final name only once complete, so a kill at any moment leaves the last
good one. No RNG state: the trainer reseeds every process at each epoch start from (seed, epoch, rank).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import write_atomically, write_text

PREFIX = "epoch-"
FINISHED = "finished.json"  # a finished run's record: options, history, result, MLflow run id


def save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(state, str(tmp)))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    model.load_state_dict(load_file(str(path)))


def latest(output_dir: str | Path) -> Path | None:
    done = sorted(p.parent for p in (Path(output_dir) / "checkpoints").glob(f"{PREFIX}*/state.json"))
    return done[-1] if done else None


def save(output_dir: str | Path, epoch: int, model, optimizer, state: dict, keep: int) -> Path:
    """Checkpoint after `epoch` (0-based) is complete; keeps the newest `keep`."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{epoch:04d}"
    tmp = root / f".tmp-{PREFIX}{epoch:04d}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):  # ours, or half-written by a killed run (a run owns its output_dir)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():  # a re-run of the same epoch after a crash between rename and cleanup
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model, optimizer) -> dict:
    load_weights(model, path / "model.safetensors")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())


def save_finished(output_dir: str | Path, record: dict, keep_checkpoints: bool) -> None:
    """Mark the run finished (finished.json, atomic), then remove its epoch checkpoints unless kept: a
    finished run needs only its record and the selected weights."""
    write_text(Path(output_dir) / FINISHED, json.dumps(record, indent=1))
    if not keep_checkpoints:
        shutil.rmtree(Path(output_dir) / "checkpoints", ignore_errors=True)


def finished(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / FINISHED
    return json.loads(path.read_text()) if path.is_file() else None
