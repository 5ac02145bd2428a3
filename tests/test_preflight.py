"""`rifle preflight`: a campaign's plan checked and priced before it spends, leaving nothing behind (no MLflow run,
no Optuna study, no checkpoint): a good plan passes (exit 0, a price), and a bad dataset, an unreachable tracking
server, an unreachable storage and an unwritable output root each fail (exit 2) with one line naming them."""
import json
import subprocess
import sys

import pytest

from conftest import free_port, subprocess_env


def preflight(tmp_path, *options, storage=None, uri=None, output_root=None):
    cmd = [sys.executable, "-m", "rifle", "preflight", "--name", "pf", "--methods", "plain,rifle,delta", "--seeds",
           "2", "--protocol", "both", "--epochs", "2", "--image_size", "48", "--train_per_class", "3",
           "--delta_attention_epochs", "1", "--workers", "2", "--json",
           "--storage", str(storage if storage is not None else tmp_path / "optuna.journal"),
           "--tracking_uri", uri or f"sqlite:///{tmp_path}/mlflow.db",
           "--output_root", str(output_root or tmp_path / "runs"), *options]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None)


def failed(report) -> dict:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def nothing_left(tmp_path):
    """No MLflow store, no journal, no run folder: the preflight left nothing behind."""
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))


@pytest.mark.slow
def test_a_good_plan_passes_is_priced_and_leaves_nothing_behind(tmp_path, digits_folder):
    before = nothing_left(tmp_path)
    proc, report = preflight(tmp_path, "--datasets", f"imagefolder:{digits_folder},digits")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["ok"] and not failed(report)
    names = [c["name"] for c in report["checks"]]
    assert sum(n.startswith("dataset ") for n in names) == 4  # 2 datasets x 2 protocols
    assert {"step plain (efficientnet_lite0, 48 px, batch 32)", "step rifle (efficientnet_lite0, 48 px, batch 32)",
            "step delta (efficientnet_lite0, 48 px, batch 32)", "storage", "tracking", "output root"} <= set(names)
    assert sum(n.startswith("input ") for n in names) == 4
    estimate = report["estimate"]
    assert estimate["cells"] == estimate["cells_priced"] == 24 and estimate["workers"] == 2
    assert 0 < estimate["hours_per_worker"] < estimate["hours"]
    assert nothing_left(tmp_path) == before  # no mlflow.db, no optuna.journal, no runs/
    table = subprocess.run([sys.executable, "-m", "rifle", "preflight", "--methods", "plain", "--seeds", "1",
                            "--epochs", "2", "--image_size", "48", "--datasets", f"imagefolder:{digits_folder}",
                            "--output_root", str(tmp_path / "runs")], cwd=tmp_path, env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
    assert table.returncode == 0 and table.stdout.startswith("rifle preflight: campaign 'campaign': 2 cells")
    assert "estimate: " in table.stdout and "hours of training in all" in table.stdout


@pytest.mark.slow
def test_each_broken_piece_fails_in_one_line_and_leaves_nothing_behind(tmp_path, digits_folder):
    (tmp_path / "one_class" / "train" / "a").mkdir(parents=True)
    (tmp_path / "a_file").write_text("x")
    before = nothing_left(tmp_path)
    proc, report = preflight(tmp_path, "--datasets", f"imagefolder:{digits_folder},imagefolder:{tmp_path}/one_class",
                             storage="postgresql://postgres@127.0.0.1:1/none", uri=f"http://127.0.0.1:{free_port()}",
                             output_root=tmp_path / "a_file" / "runs")
    assert proc.returncode == 2 and report is not None and not report["ok"], proc.stderr[-3000:]
    bad = failed(report)
    assert bad["dataset imagefolder:" + str(tmp_path / "one_class") + " (validated)"].startswith(
        "dataset imagefolder:") and "at least 2 classes" in bad[f"dataset imagefolder:{tmp_path}/one_class (validated)"]
    assert bad["storage"].startswith("cannot open the storage postgresql://postgres@127.0.0.1:1/none")
    assert bad["tracking"].startswith("the MLflow server http://127.0.0.1:") and "does not answer" in bad["tracking"]
    assert bad["output root"].startswith(f"cannot write to '{tmp_path / 'a_file' / 'runs'}'")
    assert all("\n" not in detail for detail in bad.values())
    # the good dataset's checks still ran; the broken dataset's cells are not priced
    assert not any(name.startswith(f"dataset imagefolder:{digits_folder}") for name in bad)
    assert report["estimate"]["cells_priced"] < report["estimate"]["cells"]
    assert nothing_left(tmp_path) == before
