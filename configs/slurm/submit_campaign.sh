#!/usr/bin/env bash
# A campaign on Slurm: the prepare job (preflight, one-time download, the campaign's study) and, once it
# succeeded, N worker tasks. Usage, from the repository root (N: the array's size, default 8):
#
#   export RIFLE_STORAGE='postgresql://user:password@db-host:5432/optuna'
#   export MLFLOW_TRACKING_URI=http://mlflow-host:5000 HF_HOME=/shared/hf
#   RIFLE_CAMPAIGN=configs/campaign/table1.yaml bash configs/slurm/submit_campaign.sh 64 [more campaign options]
set -euo pipefail
workers=${1:-8}
shift || true
here=$(dirname "$0")
prepare=$(RIFLE_WORKERS=$workers sbatch --parsable --export=ALL "$here/campaign_prepare.sbatch" "$@")
array=$(sbatch --parsable --export=ALL --dependency="afterok:$prepare" --array="0-$((workers - 1))" \
        "$here/campaign_array.sbatch" "$@")
echo "rifle: prepare job $prepare, then $workers workers in job $array (they start when it succeeds)"
