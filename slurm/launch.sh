#!/usr/bin/env bash
# The launcher behind slurm/mor_*.sh; runs inside the batch job, on the allocation's first node.
#
#   MOR_RUN=<run file>  bash slurm/launch.sh [key=value ...]      (the sbatch scripts set MOR_RUN)
#
# 1. Rendezvous: the allocation's first host, and a port derived from the job id (the same after a requeue, and
#    unlikely to clash with another job sharing a node).
# 2. One rank per task with srun (sbatch's --ntasks-per-node = GPUs per node); each rank reads SLURM_PROCID,
#    SLURM_NTASKS and SLURM_LOCALID, and uses NCCL on GPUs or gloo on CPU-only nodes.
# 3. Overrides from the sbatch command line go to the trainer unchanged; checkpoint.resume=auto (the default)
#    continues from the run's latest checkpoint, so a requeued job resumes by itself.
# 4. Exit code 75 means the trainer got the time-limit warning (--signal=USR1@...), saved a checkpoint on every
#    rank and wants more time: the job requeues itself. A job that Slurm requeues or preempts (SIGTERM) is put
#    back in the queue by Slurm; a cancelled one stays cancelled.
#
# Environment: MOR_ROOT (project checkout; default the directory sbatch was run from), MOR_PYTHON (default:
# .venv/bin/python when present, else python3), MOR_MASTER_PORT (to force a port; a MASTER_PORT exported from the
# submitting shell is ignored, since sbatch copies the environment and it would be stale).
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  echo "Submit with: sbatch [options] slurm/mor_{135m,360m,730m,1b7}.sh [key=value ...]  (see the top-level README)"
  exit 0
fi

ROOT=${MOR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $ROOT/pretrain/train.py ]]; then
  echo "launch.sh: $ROOT is not the project checkout: run sbatch from the checkout (cd to it first) or set MOR_ROOT" >&2
  exit 2
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "launch.sh: not inside a Slurm job: submit it, e.g. sbatch slurm/mor_1b7.sh [key=value ...]" >&2
  exit 2
fi
if [[ -z ${MOR_RUN:-} ]]; then
  echo "launch.sh: MOR_RUN is not set: name a run file from conf/run/ (the slurm/mor_*.sh scripts set it)" >&2
  exit 2
fi
cd "$ROOT"
if [[ -n ${MOR_PYTHON:-} ]]; then PY=$MOR_PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$PWD/.venv/bin/python
else PY=python3; fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
unset RANK WORLD_SIZE LOCAL_RANK   # from the submitting shell, if any: each rank takes its own from srun
export MASTER_PORT=${MOR_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export WANDB_MODE=${WANDB_MODE:-offline}
# One BLAS/OpenMP thread pool per rank, sized to its CPUs (the default would be every core, for every rank).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "launch: job ${SLURM_JOB_ID} (start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on ${SLURM_JOB_NUM_NODES:-1} node(s)," \
     "${SLURM_NTASKS} rank(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}; run ${MOR_RUN} $*"

# srun starts SLURM_NTASKS ranks and returns the highest exit status. Not --kill-on-bad-exit: ranks leaving with
# 75 a moment apart would get the later ones killed (status 143) and the requeue lost. A crashed rank makes the
# others fail at their next collective instead (the process group's timeout).
set +e
srun "$PY" -m pretrain.train "$MOR_RUN" "$@"
rc=$?
set -e

if [[ $rc -eq 75 ]]; then
  echo "launch: the trainer saved a checkpoint and asked for a requeue; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "launch: trainer exited with status $rc"
exit "$rc"
