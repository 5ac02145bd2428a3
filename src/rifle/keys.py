"""Every name a run, a parent run or a report writes to MLflow (metrics, params beyond the options, tags), grouped
by who writes it; read by the tools, the tests and the notebooks. One place, so a writer and its readers cannot
drift apart, and a store written by an older version stays readable (legacy names are kept below, named so).

It lives at the package's lowest layer (rifle.keys, not rifle.track.keys): the tricks, the block probe and the
progress line, which sit below or beside `track`, name metrics too. Imports nothing.

Not here: an option's name (it is its field in rifle.config, also a param); a trick's own per-epoch metrics
(penalty/l2, dropout/drop_rate, ...), declared in its file as `metrics = (...)` beside its options, so that a
trick is one file; Optuna's study and trial attributes (rifle.workers.storage, rifle.workers.cells).
Per-epoch metrics have step = epoch (0-based); names built from a prefix go through the helpers at the end.
"""
from __future__ import annotations

from typing import NamedTuple

# ---- metrics per epoch (the trainer, RIFLE and its control)
TRAIN_LOSS, TRAIN_ACC, VAL_ACC = "train_loss", "train_acc", "val_acc"
LR_BACKBONE, LR_HEAD, HEAD_REINIT = "lr_backbone", "lr_head", "head_reinit"
# Frobenius norm of the head's weight just before and just after a re-init (epochs that end with one)
HEAD_NORM_PRE, HEAD_NORM_POST = "head_norm_pre_reinit", "head_norm_post_reinit"
# RIFLE: the largest difference of the processes' parameter checksums after a re-init (0: identical weights)
REINIT_WEIGHT_SPREAD = "reinit_weight_spread"
HISTORY = (VAL_ACC, TRAIN_ACC, LR_HEAD, HEAD_REINIT)  # the per-epoch curves the report draws, in this order

# ---- final metrics (once, at the end of a run)
TEST_ACC, TEST_ACC_LAST, SELECTED_EPOCH = "test_acc", "test_acc_last", "selected_epoch"
BEST_VAL_ACC, BEST_EPOCH = "best_val_acc", "best_epoch"

# ---- probe prefixes, + a block name (rifle.probes.BlockProbe; `block_metric`)
WEIGHT, GRAD = "weight_dist/", "grad_norm/"                   # distance to pretrained, gradient norm per epoch
PRE, POST = "grad_norm_pre_reinit/", "grad_norm_post_reinit/"  # around each period boundary
PROBES = (WEIGHT, GRAD, PRE, POST)

# ---- params a run logs beyond its options (rifle.trainer.run_params and setup)
EPOCHS_TRAINED = "epochs_trained"      # after RIFLE's truncation to a multiple of K+1
OPTIMIZER_STEPS = "optimizer_steps"    # epochs x optimizer steps per epoch
REINIT_COUNT = "reinit_count"          # the re-inits RIFLE really makes (config.reinit_epochs)
CLR_CYCLES = "clr_cycles"              # the whole cycles cyclic_lr fits to the budget
WEIGHTS_RESOLVED = "weights_resolved"  # the pretrained weights the backbone loaded, by full name
DERIVED_PARAMS = (REINIT_COUNT, CLR_CYCLES, EPOCHS_TRAINED, OPTIMIZER_STEPS, WEIGHTS_RESOLVED)
RESOLVED_SUFFIX = "_resolved"  # a param `mlflow run` set to another value keeps it; ours is <name>_resolved

# ---- a run's tags (the trainer, rifle.env.git_state, the tracker)
TRICKS_TAG = "tricks"                  # the trick list as given ("none" without one); also an option's name
NUM_PROCESSES = "num_processes"
GIT_COMMIT, GIT_DIRTY = "git_commit", "git_dirty"
DATASET_FINGERPRINT, DATASET_COMMIT = "dataset_fingerprint", "dataset_commit"
IMAGES_SKIPPED = "images_skipped"      # images the scan skipped (bad_images=skip)
BLOCK_ORDER = "block_order"            # the backbone's blocks, input side first, comma-separated (models.block_names)
RESUMED_FROM_RUN = "resumed_from_run"  # `mlflow run`'s new run continuing the checkpoint of another run
BEFORE_REINIT_TAG = "selected_before_reinit"  # 'true': a RIFLE run selected a checkpoint before its first re-init
BEFORE_LAST_REINIT_TAG = "selected_before_last_reinit"  # 'true': ... before its last re-init (K = 1: the same)
# On a run holding a copy of a finished run's result (the same command again under `mlflow run`, or a tool's new
# child run): the finished run's id. Readers (track.reads.fetch_runs) count the two as one result.
COPY_TAG = "finished_earlier_in_run"
# MLflow's own: the UI's Source column and how the run was started; a child run's parent; a run's name; a dataset
# input's context; an experiment's kind (MLflow 3's UI: custom_model_development is model training).
SOURCE_TYPE, SOURCE_NAME, SOURCE_COMMIT = "mlflow.source.type", "mlflow.source.name", "mlflow.source.git.commit"
SOURCE_PREFIX = "mlflow.source."
PARENT_RUN = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
INPUT_CONTEXT = "mlflow.data.context"
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"

# ---- environment tags (rifle.env: what a run's numbers depend on beyond its options)
ENV_TORCH, ENV_CUDA, ENV_DEVICE = "env.torch", "env.cuda", "env.device"
ENV_THREADS, ENV_DETERMINISTIC = "env.threads", "env.deterministic"
ENV_TORCHVISION, ENV_TIMM, ENV_DATASETS = "env.torchvision", "env.timm", "env.datasets"
ENV_NUMPY, ENV_PILLOW, ENV_ACCELERATE = "env.numpy", "env.pillow", "env.accelerate"
ENV_MLFLOW, ENV_OPTUNA = "env.mlflow", "env.optuna"

# ---- a report's run (rifle.evidence.build): never read back as a result
REPORT_TAG = "rifle.report"
REPORT_REFERENCE = "rifle.report_reference"

# ---- a sweep's tree (rifle.workers.runs): a parent run per study, a child run per trial's retry chain
SWEEP_STUDY_UUID, SWEEP_ROLE, SWEEP_STUDY = "sweep.study_uuid", "sweep.role", "sweep.study"
SWEEP_METHOD, SWEEP_STORAGE, SWEEP_TRIAL = "sweep.method", "sweep.storage", "sweep.trial"
SWEEP_N_TRIALS, SWEEP_BEST_TRIAL, SWEEP_BEST_RUN_ID = "sweep.n_trials", "sweep.best_trial", "sweep.best_run_id"

# ---- a campaign's tree (rifle.workers.cells): a parent run per group, a child run per cell; its summary run
CELL_GROUP, CELL_METHOD, CELL_SEED, CELL_ROLE = "cell.group", "cell.method", "cell.seed", "cell.role"
CAMPAIGN_NAME, CAMPAIGN_METHODS, CAMPAIGN_CELL = "campaign.name", "campaign.methods", "campaign.cell"
CAMPAIGN_SUMMARY, CAMPAIGN_ROLE = "campaign.summary", "campaign.role"

# ---- rifle compare (its one group of a campaign): on each cell's run, and on the group's parent
COMPARE_STUDY, COMPARE_TRIAL = "compare.study", "compare.trial"
COMPARE_STUDIES, COMPARE_STORAGE = "compare.studies", "compare.storage"
N_SEEDS = "n_seeds"  # + "/" + a method's key (`method_metric`), as the <metric>_mean/... metrics


class TreeTags(NamedTuple):
    """The tags a tool's tree writes on a trial's (a cell's) run: its state and the reason, the epoch a retry
    resumed at, the Optuna trials that trained it; one set per tree, each under the tree's namespace."""
    state: str
    reason: str
    resumed_from_epoch: str
    optuna_trials: str


SWEEP_RUN = TreeTags("sweep.state", "sweep.reason", "sweep.resumed_from_epoch", "sweep.optuna_trials")
CELL_RUN = TreeTags("campaign.state", "campaign.reason", "campaign.resumed_from_epoch", "campaign.optuna_trials")


class Role:
    """Values of the role tags (SWEEP_ROLE, CELL_ROLE, CAMPAIGN_ROLE): which run of a tree this is."""
    PARENT, WORKER = "parent", "worker"  # the claimed parent; `mlflow run`'s run that lost the claim
    TRIAL, CELL = "trial", "seed"        # a sweep's trial, a campaign's cell (named "seed" in every store)


# ---- parent runs' metrics (step: the count, so it only grows)
TRIALS_COMPLETE, TRIALS_PRUNED, BEST_VALUE = "trials_complete", "trials_pruned", "best_value"  # a sweep's
CELLS_COMPLETE = "cells_complete"  # a campaign group's

# ---- legacy: names stores written by older versions hold, still read
# The method label of a cell's run before cells were named for cells (a comparison's child runs).
LEGACY_METHOD = "compare.method"
METHOD_TAGS = (CELL_METHOD, LEGACY_METHOD)  # read in this order
LEGACY_EPOCHS = "epochs_resolved"  # the trained epochs before EPOCHS_TRAINED (after them: `epochs`, resolved)
DEFAULT_SELECTION = "best_val"     # runs from before the `selection` param selected on validation


# ---- names built from a prefix
def block_metric(prefix: str, block: str) -> str:
    """A probe's metric of one block: weight_dist/blocks.3."""
    return f"{prefix}{block}"


def parent_link(role_tag: str) -> str:
    """The tag naming the parent on a worker's run that lost the claim: sweep.role -> sweep.parent_run_id."""
    return f"{role_tag.rsplit('.', 1)[0]}.parent_run_id"


def sweep_plot(name: str) -> str:
    """A sweep parent's tag saying whether Optuna's plot `name` was drawn (or why not)."""
    return f"sweep.plot.{name}"


def best_param(name: str) -> str:
    """A sweep parent's tag: the best trial's value of parameter `name`."""
    return f"best.{name}"


def fixed_param(name: str) -> str:
    """A sweep parent's param: an option the search space fixes."""
    return f"fixed.{name}"


def override_param(name: str) -> str:
    """rifle compare's parent param: an option given on its command line for every method."""
    return f"override.{name}"


def best_trial_tag(method_key: str) -> str:
    """rifle compare's parent tag: the study and trial each method's options came from."""
    return f"best_trial.{method_key}"


def method_metric(name: str, method_key: str) -> str:
    """rifle compare's parent metric of one method (its label as an MLflow key): test_acc_mean/rifle.l2sp."""
    return f"{name}/{method_key}"


def parent_filter(run_id: str) -> str:
    """An MLflow search filter for the child runs of `run_id`."""
    return f"tags.`{PARENT_RUN}` = '{run_id}'"


def resolved_param(name: str) -> str:
    return f"{name}{RESOLVED_SUFFIX}"
