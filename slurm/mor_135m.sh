#!/usr/bin/env bash
# MoR 135M pretraining: 1 node(s) x 8 GPUs, one rank per GPU, 12 CPUs each, 12 h per start.
#   sbatch slurm/mor_135m.sh [key=value ...]          (overrides go to the trainer: python -m pretrain.train --help)
#   Variant: MOR_RUN=135m_vanilla or 135m_mor_tc sbatch slurm/mor_135m.sh (default: 135m_mor_ec, see conf/run/).
#   Resources: sbatch options on the command line win over these, e.g. on CPU-only nodes (gloo):
#     sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --time=15 slurm/mor_135m.sh model=tiny_mor_ec ...
#   Submit from the checkout; logs go to slurm/logs/. The job resumes from its latest checkpoint when requeued
#   and requeues itself when the trainer saves at the time-limit warning (USR1 to the batch shell, 5 minutes
#   before the end); keep --time over twice that lead plus 2 minutes, or the job saves and stops instead.
#SBATCH --job-name=mor-135m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
export MOR_RUN=${MOR_RUN:-135m_mor_ec}
if [[ ${1:-} == -h || ${1:-} == --help ]]; then exec bash "$(dirname "$0")/launch.sh" --help-for "$0"; fi
exec bash "${MOR_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" "$@"
