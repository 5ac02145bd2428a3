"""trainer.fit's callbacks: `rifle.callbacks.Callback` declares the events, the trainer fires each on every
callback, a misspelled event fails when its class is defined, and a plain function is an on_epoch_end."""
import pytest
from helpers import tiny_config

from rifle.callbacks import EVENTS, Callback, EpochEnd, as_callback


def test_a_misspelled_event_fails_when_its_class_is_defined():
    with pytest.raises(TypeError, match=r"Late\.on_epoch_ends is not an event of rifle.callbacks.Callback"):
        class Late(Callback):
            def on_epoch_ends(self, epoch, metrics):
                pass
    with pytest.raises(TypeError, match="after_backwards is not an event"):
        type("Probe", (Callback,), {"after_backwards": lambda self, scale: None})

    class Fine(Callback):  # the events and helpers of other names are fine
        def on_epoch_end(self, epoch, metrics):
            pass

        def decide(self):
            pass

    assert as_callback(Fine()).__class__ is Fine


def test_plain_functions_are_wrapped_and_duck_typed_objects_refused():
    seen = []
    wrapped = as_callback(lambda epoch, metrics: seen.append((epoch, metrics["x"])))
    assert isinstance(wrapped, EpochEnd)
    for event in EVENTS[:-1]:  # the other events do nothing
        getattr(wrapped, event)(*((1.0,) if event == "after_backward" else (0,) if event == "on_epoch_start"
                                   else (0, {})))
    wrapped.on_epoch_end(3, {"x": 1})
    assert seen == [(3, 1)]

    class Old:  # a callback of the former duck-typed kind: its misspelled events would go unnoticed
        def on_epoch_end(self, epoch, metrics):
            pass

    with pytest.raises(TypeError, match="a callback is a rifle.callbacks.Callback or a function"):
        as_callback(Old())
    with pytest.raises(TypeError):
        as_callback(42)


@pytest.mark.slow
def test_fit_fires_every_event_on_every_callback_and_runs_a_plain_function_at_epoch_end(tmp_path, digits_folder):
    from rifle.trainer import fit

    events, ends = [], []

    class Recorder(Callback):
        def on_epoch_start(self, epoch):
            events.append(("start", epoch))

        def after_backward(self, scale):
            events.append(("backward", scale))

        def on_epoch_metrics(self, epoch, metrics):
            metrics["recorder/epoch"] = epoch  # added metrics are logged
            events.append(("metrics", epoch))

        def on_epoch_end(self, epoch, metrics):
            events.append(("end", epoch))

    cfg = tiny_config(tmp_path, digits_folder, epochs=2)
    result = fit(cfg, callbacks=[Recorder(), lambda epoch, metrics: ends.append((epoch, metrics["recorder/epoch"]))])
    steps = 3  # 24 training images at batch 8
    def fired(epoch):
        return [("start", epoch), *[("backward", 1.0)] * steps, ("metrics", epoch), ("end", epoch)]

    assert events == fired(0) + fired(1)
    assert ends == [(0, 0), (1, 1)]  # after the Recorder's end: the order given
    from mlflow.tracking import MlflowClient
    history = MlflowClient(cfg.run.tracking_uri).get_metric_history(result["run_id"], "recorder/epoch")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 1.0)]
    with pytest.raises(TypeError, match="a callback is a rifle.callbacks.Callback or a function"):
        fit(tiny_config(tmp_path, digits_folder, name="never"), callbacks=[object()])
    assert not (tmp_path / "never").exists()  # refused before any work
