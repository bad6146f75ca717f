#!/bin/bash
# Convert a dataset as a SLURM array job: task i of the array converts part i (cosmos-policy convert --part i
# --num_parts <array size>), into a --output folder every node sees; a job that depends on the array merges.
#
#   jid=$(sbatch --parsable --array 0-7 --cpus-per-task 8 tools/cluster/slurm_convert.sh data/libero \
#       --format robomimic --embodiment embodiments/libero.yaml --output /shared/shards/libero --workers 8)
#   sbatch --dependency afterok:$jid --export ALL,MERGE=1,NUM_PARTS=8 tools/cluster/slurm_convert.sh data/libero \
#       --format robomimic --embodiment embodiments/libero.yaml --output /shared/shards/libero
#   COSMOS_POLICY_DRY_RUN=1 SLURM_ARRAY_TASK_ID=3 SLURM_ARRAY_TASK_COUNT=8 tools/cluster/slurm_convert.sh ...
#
# Every part and the merge take the same options (the merge refuses parts made with others).
#SBATCH --job-name=cosmos-policy-convert
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: slurm_convert.sh SOURCE [cosmos-policy convert options]" >&2; exit 2; }
if [[ -n ${MERGE:-} ]]; then
    cmd=(cosmos-policy convert "$@" --num_parts "${NUM_PARTS:?slurm_convert.sh: MERGE=1 needs NUM_PARTS (the array size)}" --merge true)
else
    : "${SLURM_ARRAY_TASK_ID:?slurm_convert.sh: run it as an array job (sbatch --array 0-N)}"
    cmd=(cosmos-policy convert "$@" --part "$SLURM_ARRAY_TASK_ID" --num_parts "${SLURM_ARRAY_TASK_COUNT:?}" --progress false)
fi
if [[ -n ${COSMOS_POLICY_DRY_RUN:-} ]]; then
    echo "${cmd[*]}"
    exit 0
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${cmd[@]}"
