"""Every list of options by role comes from one query, `config.with_role`, over roles declared on the fields
(`opt(roles=...)`) and sections; each list is pinned here to its value from before the roles, so that nothing
silently changes a digest, a pairing rule, a budget check or DELTA's cache key. Change a pinned value only on
purpose: it changes what runs, reports or caches mean."""
import pytest

from rifle import config as C
from rifle import plan
from rifle.commands import compare, preflight
from rifle.evidence import tables
from rifle.workers import space

RUN_ONLY = ("num_proc", "output_dir", "keep_checkpoints", "keep_finished_checkpoints", "tracking_uri", "experiment",
            "run_name", "log_weights", "register_model", "system_metrics", "probe_reinit_steps", "network_timeout",
            "threads", "deterministic", "channels_last", "compile", "compile_backend", "pin_memory", "delta_cache_dir")
TRICKS = ("tricks", "reinit_times", "head_lr_policy", "reinit_guard_epochs", "reset_head_momentum", "reinit_init",
          "dropout_p", "dropconnect_p", "sd_survival_last", "sd_mode", "disturb_alpha", "clr_base_lr", "clr_max_lr",
          "clr_step_epochs", "l2_alpha", "l2sp_alpha", "l2sp_beta", "delta_alpha", "delta_beta", "delta_layers",
          "delta_attention_epochs", "delta_attention_batches", "delta_attention_batch_size", "delta_attention_lr")
DATA = ("dataset", "dataset_revision", "image_column", "label_column", "image_size", "hflip", "val_fraction",
        "train_per_class", "split_seed", "num_workers", "dataset_registry", "label_rate", "bad_images", "decode_cache")


def test_run_only_options_are_outside_the_digest():
    assert C.RUN_ONLY == RUN_ONLY


def test_the_reports_pairing_rules():
    assert set(tables.RUN_KEYS) == {*RUN_ONLY, "seed", "tricks", "num_workers"}
    # a method's derived params (RIFLE's re-inits, cyclic LR's cycles) differ between methods by design: no note
    assert tables.TRICK_OPTIONS == (*TRICKS, "reinit_count", "clr_cycles")
    assert tables.BUDGET_KEYS == ("epochs_trained", "optimizer_steps")  # in this order: the first that differs


def test_a_plans_budget_checks_the_epochs_first():
    assert plan.BUDGET == ("epochs", "batch_size", "grad_accum_steps", *DATA)


def test_compare_same_settings():
    assert compare.SAME_SETTINGS == (*DATA, "num_proc", "model", "pretrained", "weights", "backbone_dropout", "epochs",
                                     "batch_size", "momentum", "grad_accum_steps", "mixed_precision", "selection")


def test_deltas_cache_key():
    from rifle.tricks import delta
    assert set(delta.KEY_OPTIONS) == {
        "model", "pretrained", "dataset", "dataset_revision", "image_column", "label_column", "image_size", "hflip",
        "val_fraction", "train_per_class", "label_rate", "split_seed", "bad_images", "num_workers", "mixed_precision",
        "delta_attention_batch_size", "delta_attention_epochs", "delta_attention_batches", "delta_attention_lr"}


def test_what_a_tool_sets_for_each_run():
    assert space.MANAGED == ("output_dir", "tracking_uri", "experiment", "run_name")
    assert C.with_role("per_run") == ("output_dir", "run_name")
    parser = compare.parser()
    flags = {a.dest for a in parser._actions}
    assert not flags & {"output_dir", "run_name"} and {"tracking_uri", "experiment", "lr"} <= flags
    shown = C.with_role("managed", without=("per_run",))
    assert shown == ("tracking_uri", "experiment")


def test_preflight_loads_data_once_per_loading_options_and_times_a_step_once_per_step_options():
    assert C.with_role("delivery") == ("image_size", "hflip", "num_workers", "decode_cache", "num_proc")
    assert set(C.with_role("run_only", "data", "step_free")) == {*RUN_ONLY, *DATA, "seed", "selection", "epochs"}
    a, b = C.build({"image_size": 32}), C.build({"image_size": 64, "num_workers": 2, "seed": 3})
    assert preflight.data_key(a) == preflight.data_key(b) and preflight.step_key(a) != preflight.step_key(b)


def test_roles_are_known_and_registered_tricks_options_are_trick_options(monkeypatch):
    import dataclasses

    from rifle import catalog
    with pytest.raises(ValueError, match="unknown role"):
        C.opt(0, "x", roles=("run-only",))
    with pytest.raises(ValueError, match="unknown role"):
        C.with_role("budgets")

    @dataclasses.dataclass
    class ToyOptions:
        toy_knob: int = C.opt(1, "a registered trick's option", roles=("run_only",))

    monkeypatch.setattr(catalog, "TRICKS", dict(catalog.TRICKS))
    monkeypatch.setattr(catalog, "OPTIONS", dict(catalog.OPTIONS))
    catalog.register("toy", object, ToyOptions)
    assert C.with_role("trick")[-3:] == ("toy_knob", "reinit_count", "clr_cycles") and "toy_knob" in C.with_role("run_only")
    assert C.roles_of("toy_knob") == ("trick", "run_only") and C.roles_of("epochs_trained") == ("budget_param",)
