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

from .config import ConfigError
from .files import write_atomically, write_text

PREFIX = "epoch-"
FINISHED = "finished.json"  # a finished run's record: options, history, result, MLflow run id


def check_output_dir(path: str) -> None:
    """Fail before training if checkpoints cannot be written there."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 65536)
        probe.unlink()
    except OSError as e:
        raise ConfigError("output_dir", f"cannot write to {path!r}: {e.strerror or e}") from None


def sizes(model: torch.nn.Module, momentum: bool = True) -> tuple[int, int]:
    """(bytes of the weights, bytes of the SGD momentum) a checkpoint of `model` holds."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return weights, sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) if momentum else 0


def footprint(model: torch.nn.Module, keep: int, momentum: bool = True) -> int:
    """Bytes a run's files take at their peak: `keep` checkpoints (weights and SGD momentum) plus one being
    written, and the best weights plus a new one being written."""
    weights, optim = sizes(model, momentum)
    return (keep + 1) * (weights + optim) + 2 * weights


def check_free_space(path: str | Path, model: torch.nn.Module, keep: int, momentum: bool = True) -> None:
    """Fail before training if the run's files (`footprint`) cannot fit. Files already there count as free: a
    resumed run rotates them."""
    need, per_checkpoint = footprint(model, keep, momentum), sum(sizes(model, momentum))
    root = Path(path)
    mine = sum(f.stat().st_size for pattern in ("checkpoints/**/*", "best-*.safetensors")
               for f in root.glob(pattern) if f.is_file())
    free = shutil.disk_usage(root).free + mine
    if free < need * 1.1:  # headroom for MLflow's local files and the filesystem's own blocks
        raise ConfigError("output_dir", f"{free / 2**20:.0f} MiB free for {str(root)!r}, the run needs about "
                          f"{need * 1.1 / 2**20:.0f} MiB ({keep} checkpoint(s) of {per_checkpoint / 2**20:.0f} MiB, "
                          "one more while writing, and the best weights): free space or lower --keep_checkpoints")


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
