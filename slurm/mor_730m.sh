#!/usr/bin/env bash
# MoR 730M pretraining on 4 node(s) x 8 GPUs: sbatch slurm/mor_730m.sh [key=value ...]
#   Variant: MOR_RUN=730m_vanilla or 730m_mor_tc sbatch slurm/mor_730m.sh (default: 730m_mor_ec, see conf/run/).
#   Resources: sbatch options on the command line win over these, e.g.
#     sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/mor_730m.sh model=tiny_mor_ec ...  (CPU, gloo)
#   Submit from the checkout; logs go to slurm/logs/. The job resumes from its latest checkpoint when requeued
#   and requeues itself when the trainer saves at the time-limit warning (USR1, 5 minutes before the end).
#SBATCH --job-name=mor-730m
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
export MOR_RUN=${MOR_RUN:-730m_mor_ec}
exec bash "${MOR_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" "$@"
