"""The one parent run of a sweep's study or of a campaign's group, claimed by whichever worker comes first."""
from __future__ import annotations

import os

from .. import keys as K
from .store import all_experiment_ids, all_pages, experiment_id


def find_runs(client, tags: dict[str, str]) -> list:
    """Active runs of any experiment carrying all `tags`, oldest first (the one every worker agrees on)."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = all_pages(client.search_runs, experiment_ids=all_experiment_ids(client), filter_string=where)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def claim_parent(client, identity: dict[str, str], role_key: str, experiment: str, run_name: str,
                 tags: dict[str, str], adopt: bool = True) -> str:
    """The one parent run for `identity` tags (a sweep's study, a comparison). Under `mlflow run` (with
    `adopt`) that run claims the role, else a run is created; when another worker's run got there first (the
    oldest wins), the created run is closed and deleted, or the `mlflow run` run becomes a worker run
    pointing to the parent."""
    query = identity | {role_key: K.Role.PARENT}
    own = os.environ.get("MLFLOW_RUN_ID") if adopt else None
    found = find_runs(client, query)
    if not found:
        if own:
            for k, v in (query | tags | {K.RUN_NAME: run_name}).items():
                client.set_tag(own, k, v)
            mine = own
        else:
            mine = client.create_run(experiment_id(client, experiment), run_name=run_name,
                                     tags=query | tags).info.run_id
        found = find_runs(client, query)
        if found[0].info.run_id != mine and not own:
            client.set_terminated(mine, "KILLED")  # no RUNNING run left behind, even deleted
            client.delete_run(mine)
    winner = found[0].info.run_id
    if own and own != winner:
        client.set_tag(own, role_key, K.Role.WORKER)
        client.set_tag(own, K.parent_link(role_key), winner)
    return winner
