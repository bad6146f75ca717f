#!/bin/bash
# Train a recipe on a SLURM cluster: one task per GPU, launched by srun; Lightning reads SLURM's environment
# (SLURMEnvironment: ranks, master address and port), so no torchrun is needed. The recipe is the source of
# truth for the layout: trainer.num_nodes x trainer.devices processes (recipes/libero.yaml: 8 x 8 = 64 H100,
# FSDP2 / HSDP through ModelParallelStrategy); this script refuses an allocation that does not match it.
#
#   sbatch --nodes 8 --ntasks-per-node 8 --gpus-per-node 8 --cpus-per-task 16 --time 48:00:00 \
#       tools/cluster/slurm_fit.sh recipes/libero.yaml [more cosmos-policy fit options]
#   COSMOS_POLICY_DRY_RUN=1 tools/cluster/slurm_fit.sh recipes/libero.yaml    # print, run nothing
#
# SIGUSR1 120 s before the time limit makes Lightning save a checkpoint and requeue the job (its
# SLURMEnvironment auto-requeue), which resumes from it; add --requeue to the sbatch line for that.
#SBATCH --job-name=cosmos-policy
#SBATCH --signal=SIGUSR1@120
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

recipe=${1:?usage: slurm_fit.sh RECIPE [cosmos-policy fit options]}
shift
[[ -f $recipe ]] || { echo "slurm_fit.sh: $recipe: no such recipe file" >&2; exit 2; }
read -r nodes devices < <(python - "$recipe" <<'PY'
import sys, yaml
trainer = (yaml.safe_load(open(sys.argv[1], encoding="utf-8")) or {}).get("trainer") or {}
print(int(trainer.get("num_nodes", 1)), int(trainer.get("devices", 1)))
PY
)
cmd=(srun --kill-on-bad-exit=1 cosmos-policy fit --config "$recipe" "$@")

if [[ -n ${COSMOS_POLICY_DRY_RUN:-} ]]; then
    echo "recipe $recipe: $nodes node(s) x $devices process(es) = $((nodes * devices)) ranks"
    echo "submit: sbatch --nodes $nodes --ntasks-per-node $devices --gpus-per-node $devices $0 $recipe $*"
    echo "run:    ${cmd[*]}"
    exit 0
fi
: "${SLURM_NNODES:?slurm_fit.sh: not inside a SLURM allocation (submit it with sbatch; COSMOS_POLICY_DRY_RUN=1 to print)}"
per_node=${SLURM_NTASKS_PER_NODE%%(*}   # "8(x2)" -> 8
if [[ $SLURM_NNODES != "$nodes" || $per_node != "$devices" ]]; then
    echo "slurm_fit.sh: $recipe wants trainer.num_nodes $nodes x trainer.devices $devices, the allocation has" \
         "$SLURM_NNODES node(s) x $per_node task(s) per node (sbatch --nodes $nodes --ntasks-per-node $devices)" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec "${cmd[@]}"
