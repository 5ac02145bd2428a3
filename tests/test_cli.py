"""Bad input fails before any training: one line naming the option, exit code 2."""
import dataclasses
import re

import pytest

from conftest import ROOT, run_cli
from rifle import config as C
from rifle.commands import train

BAD_INPUT = [
    (["--model", "timm:no_such_net"], "--model: timm has no model 'no_such_net'"),
    (["--model", "resnet50"], "--model: unknown model 'resnet50'"),
    (["--dataset", "mnist"], "--dataset: unknown dataset 'mnist'"),
    (["--dataset", "imagefolder:/nonexistent/flowers"], "--dataset: directory not found"),
    (["--epochs", "3", "--reinit_times", "3"], "--reinit_times: 3 re-initializations need at least 4 epochs"),
    (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
    (["--lr", "-0.1"], "--lr: must be > 0.0"),
    (["--tricks", "rifle,mixup"], "--tricks: unknown method 'mixup'"),
    (["--mixed_precision", "fp8"], "--mixed_precision: got 'fp8', allowed: no, fp16, bf16"),
    (["--epochs", "2.5"], "--epochs: expected an integer"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUT)
def test_bad_input_returns_2_with_one_line(tmp_path, monkeypatch, capsys, args, needle):
    """`rifle train` in this process: the exit code and the one line, without starting an interpreter."""
    monkeypatch.chdir(tmp_path)
    assert train.main([*args, "--output_dir", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()  # nothing was started


def test_python_m_rifle_runs_a_verb(monkeypatch, capsys):
    import runpy
    import sys
    monkeypatch.setattr(sys, "argv", ["rifle", "train", "--lr", "fast"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("rifle", run_name="__main__")
    assert stop.value.code == 2 and "--lr: expected a number, got 'fast'" in capsys.readouterr().err


def test_rifle_help_lists_every_verb_and_each_verb_has_help(capsys):
    from rifle.commands import VERBS, main
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: rifle VERB") and all(f"  {verb} " in text for verb in VERBS)
    assert set(VERBS) == {"train", "sweep", "campaign", "compare", "report", "preflight"}
    for verb in VERBS:
        with pytest.raises(SystemExit) as stop:
            main([verb, "--help"])
        assert stop.value.code == 0 and capsys.readouterr().out.startswith(f"usage: rifle {verb}")
    assert main(["trian"]) == 2 and "unknown verb 'trian'" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.slow
def test_the_console_script_and_python_m_rifle_agree(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(sys.executable).with_name("rifle")
    for cmd in ([str(script), "--help"], [sys.executable, "-m", "rifle", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "campaign" in proc.stdout and "preflight" in proc.stdout, proc.stderr


def test_the_library_never_imports_the_commands():
    """The command modules sit apart from the library (as accelerate/commands): no module outside
    rifle/commands imports from it."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "rifle").rglob("*.py")
                 if "commands" not in p.parts and p.name != "__main__.py"
                 and re.search(r"from (rifle|\.+)\.?commands|import rifle\.commands", p.read_text())]
    assert not offenders

@pytest.mark.slow
@pytest.mark.parametrize("args,needle", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    """The same through `python -m rifle train`: nothing else (warnings, a traceback) reaches stderr."""
    proc = run_cli([*args, "--output_dir", tmp_path / "out"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def help_entries(monkeypatch, capsys) -> dict[str, str]:
    """`rifle train --help`, one entry per flag: {"--lr": "FLOAT <help> (default: 0.01)"}."""
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as stop:
        train.main(["--help"])
    assert stop.value.code == 0
    entries, name = {}, None
    for line in capsys.readouterr().out.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (--\w+)(.*)$", line)
        if m:
            name = m.group(1)
            entries[name] = m.group(2)
        elif line.startswith(" ") and name:
            entries[name] += " " + line
        else:  # a section title or a blank line
            name = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_documents_every_option(monkeypatch, capsys):
    """Every field of the config dataclasses is a flag of its type, with its own help text and its default."""
    entries = help_entries(monkeypatch, capsys)
    fields = [f for section in C.SECTIONS.values() for f in dataclasses.fields(section)]
    assert len(fields) > 50 and set(entries) == {"--config"} | {f"--{f.name}" for f in fields}
    for f in fields:
        entry = entries[f"--{f.name}"]
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        metavar = re.match(r"\w+", kind).group().upper()  # "float | None" -> FLOAT
        assert entry.startswith(metavar + " "), (f.name, entry)
        assert " ".join(f.metadata["help"].split()) in entry, f.name
        if f.metadata.get("choices"):
            assert "[" + "|".join(f.metadata["choices"]) + "]" in entry, f.name
        if "(default:" not in f.metadata["help"]:  # otherwise the help says in words what the default is
            assert entry.endswith(f"(default: {f.default!r})"), (f.name, entry)


def _default(entry: str) -> str:
    return re.search(r"\(default: ([^()]*)\)", entry).group(1)


def test_help_shows_the_defaults_the_docs_state(monkeypatch, capsys):
    """Defaults written in the docs site (the baselines' option table and the pages' prose), checked against
    --help."""
    entries = help_entries(monkeypatch, capsys)
    docs = "\n\n".join(page.read_text() for page in sorted((ROOT / "docs").rglob("*.md")))
    table = docs.split("| `--tricks` | method | options (default) |", 1)[1].split("\n\n", 1)[0]
    stated = dict(re.findall(r"`(\w+)` \(([\w.\-]+)[,:)]", table))  # `dropout_p` (0.5), `sd_mode` (batch, ...)
    assert {"dropout_p", "dropconnect_p", "disturb_alpha", "l2sp_alpha", "sd_mode", "delta_layers"} <= set(stated)
    for name, value in stated.items():
        got = _default(entries[f"--{name}"])
        try:
            assert float(got) == float(value), name
        except ValueError:  # a word: a string default (batch, auto) or what it follows (clr_max_lr: lr)
            assert got.strip("'") == value, name
    # the prose: "SGD with momentum 0.9, weight decay 1e-4, ... batch 32 per process", "`--tricks rifle` (the
    # default) with `--reinit_times K`", "validated (default) | `--val_fraction 0.2 --selection best_val`",
    # "`--probe_reinit_steps` steps, default 5", "The default run (64 px, 200 training images, 20 epochs)"
    for phrase in ("SGD with momentum 0.9, weight decay 1e-4", "batch 32 per process", "`--tricks rifle` (the default)",
                   "validated (default) | `--val_fraction 0.2 --selection best_val`",
                   "`--probe_reinit_steps` steps, default 5", "(64 px, 200 training images, 20 epochs)"):
        assert phrase in " ".join(docs.split()), phrase  # the pages' line breaks fall anywhere
    want = {"momentum": "0.9", "weight_decay": "0.0001", "batch_size": "32", "tricks": "'rifle'",
            "reinit_times": "1", "val_fraction": "0.2", "selection": "'best_val'", "probe_reinit_steps": "5",
            "image_size": "64", "epochs": "20", "mixed_precision": "'no'", "model": "'efficientnet_lite0'",
            "dataset": "'digits'"}
    assert {name: _default(entries[f"--{name}"]) for name in want} == want
    assert "[no|fp16|bf16]" in entries["--mixed_precision"] and "[follow|cyclic]" in entries["--head_lr_policy"]


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\n  epochs: 9\ntricks:\n  reinit_times: 2\nseed: 3\n")
    cfg = C.build({"seed": "4"}, str(path))
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.tricks.reinit_times, cfg.run.seed) == (0.05, 9, 2, 4)
    assert cfg.optim.head_lr == 0.05 and cfg.data.hflip is False  # derived: head follows lr; digits unflipped
    with pytest.raises(C.ConfigError, match="--lrate: unknown option"):
        C.build({"lrate": 1})


def test_default_output_dir_identifies_the_config():
    a, b = C.build({}), C.build({"lr": 0.02})
    assert a.run.output_dir == C.build({}).run.output_dir != b.run.output_dir
    assert C.build({"experiment": "other"}).run.output_dir == a.run.output_dir  # tracking is not training


@pytest.mark.slow
def test_weights_that_cannot_be_fetched_exit_2_with_one_line(tmp_path, digits_folder):
    # An empty weights cache and a proxy that refuses every connection: offline, whatever the machine has.
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = run_cli(["--model", "torchvision:resnet18", "--dataset", f"imagefolder:{digits_folder}", "--epochs", "2",
                    "--image_size", "48", "--output_dir", tmp_path / "out", "--tracking_uri",
                    f"sqlite:///{tmp_path}/m.db"], tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("rifle train: error: --model: cannot fetch the ImageNet "
                                                     "weights of torchvision:resnet18"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_key_in_a_yaml_config_names_the_file(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(C.ConfigError, match=r"--epoch: unknown option \(did you mean epochs\?\) \(in .*my.yaml\)"):
        C.build(config_file=str(path))
    path.write_text("lr: fast\n")
    with pytest.raises(C.ConfigError, match=r"--lr: expected a number, got 'fast' \(in .*my.yaml\)"):
        C.build(config_file=str(path))
    with pytest.raises(C.ConfigError, match=r"^--lr: expected a number, got 'slow'$"):  # the flag's value: no file
        C.build({"lr": "slow"}, config_file=str(path))
