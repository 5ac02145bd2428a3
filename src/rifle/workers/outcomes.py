"""How a trial ended for its worker, and how a worker ended: one table each (MLflow status, exit code)."""
from __future__ import annotations

import enum


class Outcome(str, enum.Enum):
    """How a trial ended for its worker; the MLflow run of its chain ends with RUN_STATUS."""
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    LOST = "lost"                # another worker retries it: the chain's run and directory are theirs
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM or a lost tracking server: handed back to the next worker


RUN_STATUS = {Outcome.COMPLETE: "FINISHED", Outcome.PRUNED: "KILLED", Outcome.FAILED: "FAILED",
              Outcome.INTERRUPTED: "KILLED"}


class Status(enum.Enum):
    """How a worker ended; EXIT is its process's exit code (the codes of a standalone run)."""
    REPORT = "report"                # every trial is done and this worker writes the reports
    COMPLETE = "complete"            # every trial is done; another worker writes the reports
    INCOMPLETE = "incomplete"        # done, but some trials failed
    FOLLOWER = "follower"            # a non-main process of `accelerate launch`: it only trains
    INTERRUPTED = "interrupted"      # Ctrl-C
    TERMINATED = "terminated"        # SIGTERM
    TRACKING_LOST = "tracking lost"  # the MLflow server stopped answering


EXIT = {Status.REPORT: 0, Status.COMPLETE: 0, Status.FOLLOWER: 0, Status.INCOMPLETE: 1, Status.INTERRUPTED: 130,
        Status.TERMINATED: 143, Status.TRACKING_LOST: 75}
