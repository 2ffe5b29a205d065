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
#    continues from the run's latest checkpoint, so a requeued job resumes by itself. A model=PRESET without a
#    name= runs as RUN-PRESET (e.g. 1b7_mor_ec-tiny_mor_ec), never in the run file's own folder.
# 4. The time-limit warning. The scripts ask for --signal=B:USR1@300: USR1 to this shell five minutes before the
#    limit (Slurm may send it up to a minute earlier). This shell keeps it from its first line and hands it to the
#    ranks as a file they look for at every step, so it is never lost, whether it comes before, while or after
#    they start. (Without B:, Slurm signals the ranks themselves and drops a warning sent before they run; they
#    start with USR1/USR2 blocked, so one that comes while Python starts waits for the trainer's handler.)
#    The ranks save one step together and exit 75: this shell requeues the job, which resumes.
# 5. A time limit too short for its warning: when the warning comes before half the limit has passed, the lead
#    time takes half the limit or more (it comes at once if the limit is not longer than the lead), and every
#    requeued start would be warned as early. The trainer saves, says so in one line and exits 2: no requeue.
#    Slurm may warn a minute early: keep --time over twice the lead plus two minutes (the scripts' 5: --time=15).
# 6. SIGTERM (scancel, scontrol requeue, preemption, the time limit itself) reaches this shell and every process of
#    the job step at once: ranks that have trained a step since they started save it together and exit 75 (wandb's
#    service, which dies of the same signal, is detached with one line); ranks still starting end at once (there
#    is nothing new to save). This shell waits for them and reports their status, but does not requeue: Slurm puts
#    a requeued or preempted job back in the queue itself, and a cancelled one stays cancelled. Slurm kills what
#    is left KillWait seconds after the SIGTERM (30 by default): the save of one step must fit in that.
#
# 7. Several nodes: ranks are numbered node by node (srun's block distribution), the rendezvous is the first node
#    of the allocation, and the trainer logs which ranks run on which node. Tensor-parallel groups must stay
#    inside a node: the trainer refuses, in one line, a tensor_parallel that does not divide the ranks per node.
#    A node that dies mid-run ends the job (see srun below); resubmitting resumes, also on fewer nodes.
#
# Environment: MOR_ROOT (project checkout; default the directory sbatch was run from), MOR_PYTHON (default:
# .venv/bin/python when present, else python3), MOR_MASTER_PORT (to force a port; a MASTER_PORT exported from the
# submitting shell is ignored, since sbatch copies the environment and it would be stale), MOR_RANK_EXIT_WAIT
# (seconds the other ranks get once one has exited; default 300).

# First of all: a warning that reaches this shell must not end it (bash's default for USR1/USR2).
warning="" warning_file=""
on_warning() {
  [[ -n $warning ]] && return 0
  warning="${1} $(date +%s)"
  echo "launch: got ${1} at $(date +%T) (the time-limit warning); passing it to the ranks"
  pass_warning
}
pass_warning() {   # written whole, then renamed, so that a rank never reads half of it
  if [[ -n $warning && -n $warning_file ]]; then
    { echo "$warning" >"$warning_file.tmp" && mv -f "$warning_file.tmp" "$warning_file"; } || true
  fi
}
trap 'on_warning USR1' USR1
trap 'on_warning USR2' USR2
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ ${1:-} == --help-for ]]; then   # slurm/mor_*.sh --help: that script's own header, then a pointer here
  script=$2
  sed -n '2,/^#SBATCH/p' "$script" | sed '$d; s/^# \{0,1\}//'
  echo "Resources (sbatch options on the command line win over these):"
  grep '^#SBATCH' "$script" | sed 's/^#SBATCH /  /'
  default=$(sed -n 's/^export MOR_RUN=\${MOR_RUN:-\(.*\)}$/\1/p' "$script")
  runs=$(cd "$HERE/../conf/run" && ls "${default%%_*}"_*.yaml 2>/dev/null | sed 's/\.yaml$//' | tr '\n' ' ' || true)
  echo "MOR_RUN (run file from conf/run/): ${runs:-none found}(default ${default})"
  echo "Environment, signals, requeue and time limits: bash slurm/launch.sh --help"
  exit 0
fi
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^# First of all/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
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

# The warning file lives on this node (the ranks here see it; the others learn it from them at the step's
# all-reduce). Named per start: one that SIGTERM left behind on a node must not warn a later start's ranks there.
tmp=${TMPDIR:-/tmp}
[[ -d $tmp && -w $tmp ]] || tmp=/tmp
name=$tmp/mor-warning-$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}
rm -f "$name"
warning_file=$name
export MOR_WARNING_FILE=$warning_file
trap 'rm -f "$warning_file" "$warning_file.tmp"' EXIT
pass_warning   # one that came before the file had its place

# The job's start and end, for the trainer's too-short-limit rule (pretrain/training/preempt.py). Slurm >= 23.02 exports
# these itself; on older ones they come from squeue, fresh at every start (a requeue moves both).
unset SLURM_JOB_START_TIME SLURM_JOB_END_TIME
if times=$(squeue -h -j "$SLURM_JOB_ID" -o "%S %e" 2>/dev/null) && read -r start end <<<"$times" \
   && start=$(date -d "$start" +%s 2>/dev/null) && end=$(date -d "$end" +%s 2>/dev/null); then
  export SLURM_JOB_START_TIME=$start SLURM_JOB_END_TIME=$end
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
unset RANK WORLD_SIZE LOCAL_RANK   # from the submitting shell, if any: each rank takes its own from srun
# One port per job id in 20000-31999, below Linux's ephemeral ports (pretrain/parallel/layout.py, rendezvous_port).
export MASTER_PORT=${MOR_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
export WANDB_MODE=${WANDB_MODE:-offline}
# One BLAS/OpenMP thread pool per rank, sized to its CPUs (the default would be every core, for every rank).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# Ranks start with the warnings blocked: pending, not fatal, until the trainer's first act takes them.
block=(env --block-signal=USR1 --block-signal=USR2)
if ! env --block-signal=USR1 true 2>/dev/null; then
  block=()
  echo "launch: warning: this env cannot block signals (GNU coreutils >= 8.31 can): a warning sent while a rank's" \
       "Python starts would end that rank"
fi

limit=""
[[ -n ${SLURM_JOB_END_TIME:-} ]] && limit=", time limit $(( (SLURM_JOB_END_TIME - SLURM_JOB_START_TIME) / 60 )) min"
echo "launch: job ${SLURM_JOB_ID} (start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on ${SLURM_JOB_NUM_NODES:-1} node(s)," \
     "${SLURM_NTASKS} rank(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}${limit}; run ${MOR_RUN} $*"

# srun starts SLURM_NTASKS ranks and returns the highest exit status. Not --kill-on-bad-exit: ranks leaving with
# 75 a moment apart would get the later ones killed (status 143) and the requeue lost. A crashed rank (or a whole
# node's) makes the others fail at their next collective instead: at once when its connections close, after
# parallel.collective_timeout_s when it hangs; they exit 4 with one line. --wait: once one rank has exited, the rest
# get MOR_RANK_EXIT_WAIT seconds (default 300) to follow before Slurm ends them, so that ranks which can no longer
# fail by themselves (stopped, or on a frozen node) do not hold the job until its time limit.
# In the background, so that this shell takes a warning while the ranks run (bash runs a trap only once the
# foreground command is done); a trap cuts `wait` short (status > 128) while srun still runs: wait again.
set +e
terminated=""
trap 'terminated=1; echo "launch: got SIGTERM at $(date +%T); the ranks save what they trained and exit"' TERM
srun --wait="${MOR_RANK_EXIT_WAIT:-300}" "${block[@]}" "$PY" -m pretrain.train "$MOR_RUN" "$@" &
srun_pid=$!
[[ -n $terminated ]] && kill -TERM "$srun_pid" 2>/dev/null   # it came while srun was being started
while :; do
  wait "$srun_pid"
  rc=$?
  (( rc > 128 )) && kill -0 "$srun_pid" 2>/dev/null && continue
  break
done
set -e

if [[ -n $terminated ]]; then
  echo "launch: trainer exited with status $rc after SIGTERM (75: saved); Slurm requeues or ends the job itself"
  exit "$rc"
fi
if [[ $rc -eq 75 ]]; then
  echo "launch: the trainer saved a checkpoint and asked for a requeue; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if [[ $rc -eq 4 || $rc -gt 128 ]]; then
  echo "launch: ranks were lost (a node or rank died or hung: see the lines above); submit the job again" \
       "(fewer nodes work too) and it resumes from the run's newest checkpoint that verifies"
fi
echo "launch: trainer exited with status $rc"
exit "$rc"
