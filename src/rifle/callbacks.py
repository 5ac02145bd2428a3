"""What observes a run: `Callback`, one no-op method per event `trainer.fit` fires, as composer's callbacks.

The trainer calls every event on every callback (no lookup by name), so a subclass overrides the events it needs;
a method named like an event that is none (`on_epoch_ends`) is refused when its class is defined, so a misspelled
event fails at once instead of never being called. Torch-free: a sweep imports it before torch loads.
"""
from __future__ import annotations

from collections.abc import Callable

# In the order of a run (docs/architecture.md, "Hook order").
EVENTS = ("on_epoch_start", "after_backward", "on_epoch_metrics", "on_epoch_end")
EVENT_PREFIXES = ("on_", "after_", "before_")


class Callback:
    """Observes training; the trainer fires, on every process:

    - `on_epoch_start(epoch)` after the tricks' epoch start and the epoch's seeds;
    - `after_backward(scale)` after each backward that syncs, before the optimizer step (scale: the fp16 loss
      scale, 1 otherwise);
    - `on_epoch_metrics(epoch, metrics)` after validation and the tricks' epoch end; may add metrics to log;
    - `on_epoch_end(epoch, metrics)` after the checkpoint and logging; may raise to stop the run (its MLflow run
      then ends FAILED, KILLED on Ctrl-C).
    Epochs count from 0, as MLflow's steps and the checkpoints do."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = [name for name in vars(cls) if name.startswith(EVENT_PREFIXES) and name not in EVENTS]
        if unknown:
            raise TypeError(f"{cls.__qualname__}.{unknown[0]} is not an event of rifle.callbacks.Callback "
                            f"(events: {', '.join(EVENTS)})")

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def after_backward(self, scale: float) -> None:
        pass

    def on_epoch_metrics(self, epoch: int, metrics: dict) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        pass


class EpochEnd(Callback):
    """A plain function `fn(epoch, metrics)` as a callback: its `on_epoch_end`."""

    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.fn(epoch, metrics)


def as_callback(c) -> Callback:
    """`c` itself when a Callback, a plain function wrapped as `EpochEnd`; anything else (an object with event
    methods but not a Callback, whose misspelled events nothing would catch) is refused."""
    if isinstance(c, Callback):
        return c
    if callable(c) and not any(hasattr(c, name) for name in EVENTS):
        return EpochEnd(c)
    raise TypeError(f"a callback is a rifle.callbacks.Callback or a function (epoch, metrics), not {c!r}")
