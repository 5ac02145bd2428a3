"""The study's MLflow tree, written by the main process of each worker.

One parent run per study, found again by the study's uuid tag (under `mlflow run` the run it made is the
parent, or a worker run pointing to the parent when the study already has one); one child run per retry
chain (a trial and its retries), with the state (complete / pruned / failed / retrying / interrupted) and
its reason as tags. After each finished trial the parent gets one point per metric at step = the number of
finished trials (it only grows), the best trial's parameters (tags and best_params.json) and Optuna's plots.
"""
from __future__ import annotations

import os
import time
import warnings

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from .. import keys as K
from ..track.parents import claim_parent, find_runs
from .outcomes import RUN_STATUS, Outcome
from .storage import STUDY_ATTR

RETRY_ORIGIN_ATTR = "failed_trial"  # set by RetryHeartbeatStaleTrialCallback: the first trial of the chain


def origin(trial) -> int:
    """The first trial of a retry chain (its output dir and MLflow run belong to the whole chain). Optuna's
    public `RetryFailedTrialCallback.retried_trial_number` gives only the trial retried last, not the first."""
    return int(trial.system_attrs.get(RETRY_ORIGIN_ATTR, trial.number))


def trial_done(client, tags: K.TreeTags, run_id: str, state: Outcome, reason: str | None = None) -> None:
    """The state and reason tags always agree (a retry that completes drops the reason its stale attempt
    left); the run ends with the state's status."""
    client.set_tag(run_id, tags.state, state.value)
    if reason:
        client.set_tag(run_id, tags.reason, reason[:4000])
    elif tags.reason in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, tags.reason)
    if client.get_run(run_id).info.status != RUN_STATUS[state]:
        client.set_terminated(run_id, RUN_STATUS[state])


def on_retry(tree, runs: list, trial, retried: bool) -> None:
    """A worker stopped beating: the trial's runs wait for its retry, or fail when retries are used up."""
    why = f"trial {trial.number}: its worker stopped sending heartbeats"
    for run in runs:
        if retried:
            tree.client.set_tag(run.info.run_id, tree.tags.state, "retrying")
            tree.client.set_tag(run.info.run_id, tree.tags.reason, f"{why}; retried from the last epoch checkpoint")
        else:
            tree.trial_done(run.info.run_id, Outcome.FAILED, f"{why} and the retries are used up")


class SweepRuns:
    tags = K.SWEEP_RUN  # the tags this tree writes on a trial's run

    def __init__(self, uri: str, experiment: str, study, shown_storage: str, params: dict, n_trials: int):
        self.client = c = MlflowClient(uri)
        self.n_trials = n_trials
        info = study.user_attrs[STUDY_ATTR]
        self.study_name, self.uuid = study.study_name, info["uuid"]
        self.parent = claim_parent(c, {K.SWEEP_STUDY_UUID: self.uuid}, K.SWEEP_ROLE, experiment, study.study_name,
                                   {K.SWEEP_STUDY: study.study_name, K.SWEEP_METHOD: info["method"]})
        run = c.get_run(self.parent)
        self.experiment_id = run.info.experiment_id
        self.experiment_name = c.get_experiment(self.experiment_id).name
        new = [Param(k, str(v)) for k, v in params.items() if k not in run.data.params]
        try:
            c.log_batch(self.parent, params=new, tags=[RunTag(K.SWEEP_STORAGE, shown_storage)])
        except MlflowException:
            pass  # a worker starting at the same moment logged them (params are write-once)

    def _chain(self, number: int) -> list:
        return find_runs(self.client, {K.SWEEP_STUDY_UUID: self.uuid, K.SWEEP_ROLE: K.Role.TRIAL,
                                       K.SWEEP_TRIAL: str(number)})

    def child(self, trial, origin_number: int) -> str:
        """The trial's run: the one its first attempt made (a retry resumes it), else a new one."""
        c, trial_number = self.client, trial.number
        if self.parent != os.environ.get("MLFLOW_RUN_ID") and c.get_run(self.parent).info.status != "RUNNING":
            c.update_run(self.parent, status="RUNNING")  # a finished study was extended or resumed
        found = self._chain(origin_number)
        if found:
            run_id = found[0].info.run_id
            numbers = found[0].data.tags.get(self.tags.optuna_trials, "")
            c.log_batch(run_id, tags=[RunTag(self.tags.optuna_trials, f"{numbers},{trial_number}".strip(",")),
                                      RunTag(self.tags.state, "running")])
            return run_id
        return c.create_run(self.experiment_id, run_name=f"{self.study_name}-trial-{origin_number}", tags={
            K.PARENT_RUN: self.parent, K.SWEEP_ROLE: K.Role.TRIAL, K.SWEEP_STUDY_UUID: self.uuid,
            K.SWEEP_STUDY: self.study_name, K.SWEEP_TRIAL: str(origin_number),
            self.tags.optuna_trials: str(trial_number), self.tags.state: "running"}).info.run_id

    def finished(self, run_id: str) -> float | None:
        return None  # a trial's run is its own: never finished before the trial

    def trial_done(self, run_id: str, state: str, reason: str | None = None) -> None:
        trial_done(self.client, self.tags, run_id, state, reason)

    def on_retry(self, trial, retried: bool) -> None:
        on_retry(self, self._chain(origin(trial)), trial, retried)

    def after_trial(self, study, trial) -> None:
        """A study.optimize callback: one point per parent metric for this finished trial, then the best trial.
        The step is the number of finished trials, which only grows (MLflow shows the value at the highest
        step: with the trial's number a retry finishing after a later trial would show a stale count)."""
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        states = [t.state for t in study.get_trials(deepcopy=False)]
        complete, pruned = states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED)
        metrics = {K.TRIALS_COMPLETE: complete, K.TRIALS_PRUNED: pruned}
        tags = {K.SWEEP_N_TRIALS: str(self.n_trials)}
        if complete:
            best = study.best_trial
            metrics[K.BEST_VALUE] = best.value
            tags |= {K.SWEEP_BEST_TRIAL: str(origin(best))} | {K.best_param(k): str(v) for k, v in best.params.items()}
            best_runs = self._chain(origin(best))
            if best_runs:
                tags[K.SWEEP_BEST_RUN_ID] = best_runs[0].info.run_id
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent, metrics=[Metric(k, float(v), now, complete + pruned)
                                                    for k, v in metrics.items()])
        self._set_tags(tags)
        if complete:
            self.client.log_dict(self.parent, {"trial": origin(best), "value": best.value, "params": best.params},
                                 "best_params.json")
            self._plots(study)

    def _set_tags(self, tags: dict) -> None:
        """Every worker writes the parent's summary tags: two inserting the same new tag at once make SQLite
        refuse one (UNIQUE constraint failed); retried, the row exists and is updated."""
        batch = [RunTag(k, v) for k, v in tags.items()]
        try:
            self.client.log_batch(self.parent, tags=batch)
        except MlflowException:
            time.sleep(0.5)
            self.client.log_batch(self.parent, tags=batch)

    def _plots(self, study) -> None:
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
        for name, plot in {"optimization_history.png": ovm.plot_optimization_history,
                           "param_importances.png": ovm.plot_param_importances}.items():
            # Optuna's plots set the process-wide style (plt.style.use("ggplot")): kept inside, so the reports this
            # process draws later look as every other process's do.
            with warnings.catch_warnings(), plt.rc_context():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                try:
                    ax = plot(study)
                except (ValueError, RuntimeError, ZeroDivisionError) as e:
                    # importances need two complete trials with different values: say why it is missing
                    self.client.set_tag(self.parent, K.sweep_plot(name), f"not drawn: {e}"[:500])
                    continue
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                self.client.log_figure(self.parent, fig, name)
                plt.close(fig)
            self.client.set_tag(self.parent, K.sweep_plot(name), "drawn")

    def finish(self, complete: bool) -> None:
        self.client.set_tag(self.parent, self.tags.state, "complete" if complete else "running")
        if complete and self.parent != os.environ.get("MLFLOW_RUN_ID") and \
                self.client.get_run(self.parent).info.status != "FINISHED":
            self.client.set_terminated(self.parent, "FINISHED")
