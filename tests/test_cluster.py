"""Cluster recipes in configs/: accelerate config files launched for real (two gloo CPU processes), the
Slurm scripts run under a simulated one-node Slurm (fake srun / scontrol on PATH), and the warning for
`accelerate launch --num_processes 2` without --multi_gpu, which starts one process."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, TINY, free_port, mlflow_runs, postgres_database, subprocess_env
from helpers import tiny_space

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CONFIGS = ROOT / "configs"
TRAIN_SCRIPT = CONFIGS / "slurm" / "train_multinode.sbatch"
SWEEP_SCRIPT = CONFIGS / "slurm" / "sweep_array.sbatch"
CAMPAIGN_SCRIPT = CONFIGS / "slurm" / "campaign_array.sbatch"
PREPARE_SCRIPT = CONFIGS / "slurm" / "campaign_prepare.sbatch"
ONE_PROCESS_WARNING = "warning: accelerate launch started 1 process"
PASSWORD = "cluster-pw"

# srun as one task on this machine: drop srun's own options (the scripts give them as --opt=value), log the
# call, run the command.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""
# `scontrol show hostnames <list>`: the hosts in $FAKE_HOSTS (one a line), else this machine.
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
if [[ -n ${FAKE_HOSTS:-} ]]; then printf '%s\\n' $FAKE_HOSTS; else hostname; fi
"""
# accelerate that only says how it was called (and with how many threads)
FAKE_ACCELERATE = """#!/usr/bin/env bash
echo "accelerate $* OMP_NUM_THREADS=$OMP_NUM_THREADS"
"""


def tiny_train(tmp_path, folder, epochs=2, tricks="rifle"):
    """rifle train options: the 4-class digits folder at 48 px, 3 images per class, no weights artifact;
    RIFLE's one re-initialization needs two epochs, plain fine-tuning trains one."""
    return ["--dataset", f"imagefolder:{folder}", *TINY, "--epochs", str(epochs), "--tricks", tricks,
            "--log_weights", "false",
            "--output_dir", str(tmp_path / "out"), "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]


def fake_bin(tmp_path, scontrol=True, accelerate=False):
    d = tmp_path / "fake-bin"
    d.mkdir(exist_ok=True)
    tools = {"srun": FAKE_SRUN} | ({"scontrol": FAKE_SCONTROL} if scontrol else {}) | (
        {"accelerate": FAKE_ACCELERATE} if accelerate else {})
    for name, text in tools.items():
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def slurm_env(tmp_path, bin_dir, without_scontrol=False, **extra):
    """A one-node Slurm job's environment (none of the caller's SLURM_* leaks in), the fake tools first on
    PATH, submitted from the repository root (so the scripts find configs/ and .venv/), one thread each.
    without_scontrol: no folder of PATH holds an scontrol (a real one included)."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    path = [d for d in env["PATH"].split(os.pathsep) if not (without_scontrol and (Path(d) / "scontrol").exists())]
    env |= {"PATH": os.pathsep.join([str(bin_dir), *path]), "FAKE_SLURM_LOG": str(tmp_path / "srun.log"),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rifle-test", "SLURM_SUBMIT_DIR": str(ROOT),
            "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": socket.gethostname(), "OMP_NUM_THREADS": "1"}
    return env | extra


def run_script(script, args, tmp_path, env, timeout=600):
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------ accelerate configs

@pytest.mark.parametrize("name, extra, expect", [
    ("cpu_2proc", [], dict(multi_gpu=True, num_processes=2, num_machines=1, main_process_port=0)),
    ("gpu_1", [], dict(multi_gpu=False, num_processes=1, num_machines=1)),
    ("gpu_1node", [], dict(multi_gpu=True, num_processes=4, num_machines=1)),
    ("gpu_1node", ["--num_processes", "8"], dict(multi_gpu=True, num_processes=8)),
    ("multi_node", [], dict(multi_gpu=True, num_processes=8, num_machines=2, machine_rank=0,
                            main_process_ip="MAIN_HOST", main_process_port=29500)),
])
def test_accelerate_configs_read_as_accelerate_launch_reads_them(name, extra, expect):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / "accelerate" / f"{name}.yaml"), *extra, "-m", "rifle", "train"])
    args, _, _ = _validate_launch_command(args)
    assert {k: getattr(args, k) for k in expect} == expect
    assert (args.mixed_precision, args.dynamo_backend) == ("no", "no")


@pytest.mark.slow
def test_cpu_config_trains_with_two_processes(tmp_path, digits_folder):
    cmd = [ACCELERATE, "launch", "--config_file", str(CONFIGS / "accelerate" / "cpu_2proc.yaml"),
           "-m", "rifle", "train", *tiny_train(tmp_path, digits_folder)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ONE_PROCESS_WARNING not in proc.stderr
    _, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["num_processes"] == "2"
    assert proc.stdout.count("test_acc=") == 1


@pytest.mark.slow
def test_readme_launch_without_multi_gpu_warns_that_one_process_trains(tmp_path, digits_folder):
    # What the README's `accelerate launch --num_processes 2 -m rifle train` does without --multi_gpu on a
    # machine with fewer than two GPUs: accelerate's simple launcher starts one process.
    cmd = [ACCELERATE, "launch", "--num_processes", "2", "-m", "rifle", "train",
           *tiny_train(tmp_path, digits_folder, epochs=1, tricks="none")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if ONE_PROCESS_WARNING in line]
    assert len(warnings) == 1 and "--multi_gpu" in warnings[0] and "configs/accelerate/cpu_2proc.yaml" in warnings[0]
    _, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert [r.data.tags["num_processes"] for r in runs] == ["1"]


def test_one_process_warning_only_under_the_simple_launcher(monkeypatch, capsys):
    from rifle import launch
    for k in ("ACCELERATE_DYNAMO_BACKEND", "MASTER_ADDR", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
              "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(launch, "_warned_one_process", False)
    launch.warn_one_process_launch()                            # plain `python -m rifle train`
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    launch.warn_one_process_launch()                            # `accelerate launch`, one process asked
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    launch.warn_one_process_launch()                            # torchrun (--multi_gpu) started them
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("WORLD_SIZE")
    launch.warn_one_process_launch()
    launch.warn_one_process_launch()                            # once per process (a sweep's trials)
    assert capsys.readouterr().err.count(ONE_PROCESS_WARNING) == 1


def test_cpu_processes_rule_is_the_trainers_and_the_workers(monkeypatch):
    """One rule (rifle.launch) for the trainer's Accelerator and the sweep worker's process state: Accelerate is
    told cpu=True only for several processes without CUDA."""
    import torch

    from rifle import launch
    from rifle.workers import worker
    assert worker.distributed_state is launch.distributed_state
    for cuda, world, want in ((False, None, False), (False, "1", False), (False, "2", True), (True, "2", False)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        assert launch.cpu_processes() is want, (cuda, world)


# -------------------------------------------------------------------------------------- Slurm scripts

@pytest.mark.slow
@pytest.mark.parametrize("nnodes, scontrol, want", [
    (2, True, "node001"),                 # the first host Slurm lists
    (1, False, socket.gethostname()),     # no scontrol, one node: this host
    (2, False, None),                     # no scontrol, several nodes: refused, with the fix
])
def test_train_script_launch_line(tmp_path, nnodes, scontrol, want):
    """The accelerate command each node gets, read back by accelerate's own launcher code (accelerate itself
    replaced by a stub that prints its arguments)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    env = slurm_env(tmp_path, fake_bin(tmp_path, scontrol=scontrol, accelerate=True),
                    without_scontrol=not scontrol,
                    SLURM_NNODES=str(nnodes), SLURM_NODEID=str(nnodes - 1), SLURM_CPUS_PER_TASK="8",
                    FAKE_HOSTS="node001 node002", RIFLE_PROCS_PER_NODE="4", RIFLE_ACCELERATE="accelerate")
    env.pop("OMP_NUM_THREADS")
    proc = run_script(TRAIN_SCRIPT, ["--epochs", "1"], tmp_path, env, timeout=60)
    if want is None:
        assert proc.returncode == 2 and "set RIFLE_MAIN_HOST" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "srun.log").read_text().split()[:7] == [
        "srun", f"--nodes={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=8",
        "bash", "-c"]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("accelerate "))
    argv = line.split()[1:]
    assert argv.pop() == "OMP_NUM_THREADS=2"                     # 8 CPUs over 4 processes
    assert argv[argv.index("-m"):] == ["-m", "rifle", "train", "--epochs", "1"]
    args = launch_command_parser().parse_args(argv[1:])
    assert args.config_file == str(CONFIGS / "accelerate" / "multi_node.yaml")
    args, _, _ = _validate_launch_command(args)
    assert (args.num_machines, args.num_processes, args.machine_rank) == (nnodes, 4 * nnodes, nnodes - 1)
    assert (args.main_process_ip, args.main_process_port) == (want, 24242)  # 20000 + job id 4242
    if nnodes > 1:  # (machine_rank 1 does not probe the port, so nothing is bound here)
        prepare_multi_gpu_env(args)
        assert (args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint) == ("4", "2", 1, "node001:24242")


@pytest.mark.slow
def test_train_script_without_options_says_how(tmp_path):
    proc = run_script(TRAIN_SCRIPT, [], tmp_path, slurm_env(tmp_path, fake_bin(tmp_path)), timeout=60)
    assert proc.returncode == 2 and "usage: sbatch" in proc.stderr


@pytest.mark.slow
def test_train_script_trains_under_simulated_slurm(tmp_path, digits_folder):
    """The real script, accelerate and trainer: 1 node x 2 gloo CPU processes through multi_node.yaml."""
    port = free_port()
    env = slurm_env(tmp_path, fake_bin(tmp_path), RIFLE_PROCS_PER_NODE="2", RIFLE_MAIN_PORT=str(port),
                    RIFLE_ACCELERATE=ACCELERATE)
    proc = run_script(TRAIN_SCRIPT, tiny_train(tmp_path, digits_folder), tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"rendezvous {socket.gethostname()}:{port}" in proc.stdout
    assert "launching as machine_rank 0" in proc.stdout
    assert (tmp_path / "srun.log").read_text().startswith("srun --nodes=1 --ntasks-per-node=1")
    _, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["num_processes"] == "2" and "test_acc" in runs[0].data.metrics
    assert ONE_PROCESS_WARNING not in proc.stderr


@pytest.mark.slow
def test_sweep_array_task_runs_a_worker_on_postgres(tmp_path, digits_folder):
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.tracking.MlflowClient(uri).search_experiments()  # the store's tables, before any worker opens it
    with postgres_database("rifle_cluster", password=PASSWORD) as url:
        env = slurm_env(tmp_path, fake_bin(tmp_path), RIFLE_STORAGE=url, MLFLOW_TRACKING_URI=uri,
                        RIFLE_SPACE=str(tiny_space(tmp_path, digits_folder, tricks="none", epochs=1)), RIFLE_N_TRIALS="2",
                        RIFLE_OUTPUT_ROOT=str(tmp_path / "sweeps"), SLURM_ARRAY_JOB_ID="4300",
                        SLURM_ARRAY_TASK_ID="3", SLURM_JOB_ID="4303", SLURM_CPUS_PER_TASK="1")
        proc = run_script(SWEEP_SCRIPT, ["--pruner", "none"], tmp_path, env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "sweep worker 4300_3" in proc.stdout
        assert PASSWORD not in proc.stdout + proc.stderr
        storage = optuna.storages.RDBStorage(url)
        try:
            trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
        finally:
            storage.engine.dispose()  # close its connections before the database is dropped
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    _, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3
    assert parents[0].info.status == "FINISHED" and "***" in parents[0].data.params["storage"]
    assert not any(PASSWORD in str(v) for r in runs for v in (*r.data.params.values(), *r.data.tags.values()))


@pytest.mark.slow
def test_campaign_prepare_job_then_array_tasks_share_the_cells_on_postgres(tmp_path, digits_folder):
    """The recipe: the prepare job checks and prices the plan (rifle preflight) and makes the campaign (rifle
    campaign --prepare, training nothing); then two array tasks at once on one PostgreSQL storage: each cell
    trained once, by one of them, reading the data offline; the task that completed the last cell writes the
    reports."""
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.tracking.MlflowClient(uri).search_experiments()  # the store's tables, before any worker opens it
    campaign = tmp_path / "tiny.yaml"
    campaign.write_text(f"name: tiny\nmethods: [plain, rifle]\nseeds: 2\nprotocol: validated\n"
                        f"fixed: {{image_size: 48, batch_size: 16, epochs: 2, log_weights: false}}\n"
                        f"datasets: {{'imagefolder:{digits_folder}': {{}}}}\n")
    with postgres_database("rifle_campaign_array", password=PASSWORD) as url:
        common = dict(RIFLE_STORAGE=url, MLFLOW_TRACKING_URI=uri, RIFLE_CAMPAIGN=str(campaign),
                      RIFLE_OUTPUT_ROOT=str(tmp_path / "cells"), SLURM_CPUS_PER_TASK="1")
        prepare = run_script(PREPARE_SCRIPT, [], tmp_path, slurm_env(tmp_path, fake_bin(tmp_path), RIFLE_WORKERS="2",
                                                                      **common), timeout=900)
        assert prepare.returncode == 0, prepare.stdout[-2000:] + prepare.stderr[-3000:]
        assert "rifle preflight: campaign 'tiny': 4 cells" in prepare.stdout and "estimate:" in prepare.stdout
        assert "campaign 'tiny' prepared" in prepare.stdout and PASSWORD not in prepare.stdout + prepare.stderr
        storage = optuna.storages.RDBStorage(url)
        try:
            waiting = optuna.load_study(study_name="campaign:tiny", storage=storage).get_trials()
        finally:
            storage.engine.dispose()
        assert [t.state for t in waiting] == [TrialState.WAITING] * 4  # the cells wait; nothing trained
        tasks = []
        for task in ("0", "1"):
            env = slurm_env(tmp_path, fake_bin(tmp_path), SLURM_ARRAY_JOB_ID="4400", SLURM_ARRAY_TASK_ID=task,
                            SLURM_JOB_ID=f"440{task}", **common)
            tasks.append(subprocess.Popen(["bash", str(CAMPAIGN_SCRIPT)], cwd=tmp_path, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs = [t.communicate(timeout=900) for t in tasks]
        for t, (out, err) in zip(tasks, outs):
            assert t.returncode == 0, out[-2000:] + err[-3000:]
            assert PASSWORD not in out + err
        assert {f"campaign worker 4400_{i}" in out for i, (out, _) in enumerate(outs)} == {True}
        storage = optuna.storages.RDBStorage(url)
        try:
            trials = optuna.load_study(study_name="campaign:tiny", storage=storage).get_trials()
        finally:
            storage.engine.dispose()
    assert len({t.user_attrs["rifle:cell"] for t in trials if t.state == TrialState.COMPLETE}) == 4
    assert sorted(out.count("summary: ") for out, _ in outs) == [0, 1]  # one task wrote the reports
    assert (tmp_path / "cells" / "reports" / "tiny" / "summary.md").is_file()
    _, runs = mlflow_runs(uri)
    cells = [r for r in runs if r.data.tags.get("cell.role") == "seed"]
    assert len(cells) == 4 and all(r.info.status == "FINISHED" for r in cells)
    assert not any(PASSWORD in str(v) for r in runs for v in (*r.data.params.values(), *r.data.tags.values()))


def test_submit_script_makes_the_array_wait_for_the_prepare_job(tmp_path):
    """submit_campaign.sh: the prepare job first, the array with afterok on its id and N tasks."""
    bin_dir = fake_bin(tmp_path)
    (bin_dir / "sbatch").write_text('#!/usr/bin/env bash\necho "$@" >> "$FAKE_SLURM_LOG"\n'
                                    'echo $((1000 + $(wc -l < "$FAKE_SLURM_LOG")))\n')
    (bin_dir / "sbatch").chmod(0o755)
    proc = run_script(CONFIGS / "slurm" / "submit_campaign.sh", ["16", "--seeds", "3"], tmp_path,
                      slurm_env(tmp_path, bin_dir), timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = (tmp_path / "srun.log").read_text().splitlines()
    assert first.endswith("campaign_prepare.sbatch --seeds 3")
    assert "--dependency=afterok:1001 --array=0-15" in second and second.endswith("campaign_array.sbatch --seeds 3")
    assert "prepare job 1001, then 16 workers in job 1002" in proc.stdout


@pytest.mark.slow
def test_sweep_array_without_storage_names_the_variable(tmp_path):
    env = slurm_env(tmp_path, fake_bin(tmp_path), SLURM_ARRAY_TASK_ID="0")
    env.pop("RIFLE_STORAGE", None)
    proc = run_script(SWEEP_SCRIPT, [], tmp_path, env, timeout=60)
    assert proc.returncode != 0 and "RIFLE_STORAGE" in proc.stderr
