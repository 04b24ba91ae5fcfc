#!/usr/bin/env bash
# Train saejax on GPU nodes under SLURM: one process per node (all its GPUs), started by srun.
#
#   sbatch [sbatch options] launch/gpu_slurm.sh [--dry-run] [-- extra training flags]
#
#   CONFIG=configs/large.py WORKDIR=/shared/runs/large1 sbatch --nodes=2 launch/gpu_slurm.sh
#   # one process per GPU instead: sbatch --ntasks-per-node=8 --gpus-per-task=1 launch/gpu_slurm.sh
#   # stop gracefully (checkpoint, then exit):  scancel --signal=TERM JOBID
#   # see what it would run, without SLURM:     bash launch/gpu_slurm.sh --dry-run
#
# Environment (defaults in brackets):
#   CONFIG [configs/base.py]   WORKDIR [runs/$SLURM_JOB_NAME-$SLURM_JOB_ID]: on a filesystem every
#   node sees (Orbax checkpoints are written by all processes together)
#   VENV [.venv]: a virtualenv with `pip install -e '.[gpu]'`   PORT [derived from the job id]
#
# Process 0 runs on the first node of the allocation and hosts JAX's coordination service at
# HEAD:PORT; every task gets --coordinator_address, --num_processes=$SLURM_NTASKS and
# --process_id=$SLURM_PROCID (evaluated inside its own task). SIGTERM, from `scancel --signal=TERM`
# or from `--signal` below 5 minutes before the time limit, reaches every task: saejax agrees on one
# step, checkpoints and exits. A job requeued after preemption (`--requeue`) keeps its id, so its
# WORKDIR, and resumes from the last checkpoint; a new job resumes if given the same WORKDIR.
#
#SBATCH --job-name=saejax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

DRY_RUN=0
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ && !/^#SBATCH/ { sub(/^# ?/, ""); print; next }
                    NR > 1 && !/^#/ { exit }' "$0"; exit 0 ;;
    *) echo "gpu_slurm.sh: unknown argument '$1' (training flags go after --)" >&2; exit 2 ;;
  esac
done

# Under --dry-run outside an allocation, a stand-in two-node job shows the commands.
if ((DRY_RUN)) && [[ -z "${SLURM_JOB_ID:-}" ]]; then
  SLURM_JOB_ID=12345 SLURM_JOB_NAME=saejax SLURM_JOB_NODELIST="gpu-node-1,gpu-node-2"
  SLURM_NNODES=2 SLURM_NTASKS=2
fi
: "${SLURM_JOB_ID:?run under sbatch (or pass --dry-run)}"

# SLURM runs a copy of this script from its spool directory: the repository is where it was
# submitted from.
REPO=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
CONFIG=${CONFIG:-configs/base.py}
WORKDIR=${WORKDIR:-runs/${SLURM_JOB_NAME:-saejax}-$SLURM_JOB_ID}
VENV=${VENV:-$REPO/.venv}
PORT=${PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # one port per job: two jobs may share a node

# The coordinator is the allocation's first node (scontrol expands ranges like gpu[1-4]).
if command -v scontrol >/dev/null; then
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
  HEAD=${SLURM_JOB_NODELIST%%,*}
fi

quote() {  # one word for a POSIX shell, single-quoted when needed (like Python's shlex.quote)
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local sep=""; for word in "$@"; do printf '%s' "$sep"; quote "$word"; sep=" "; done; }

flags=(--config="$CONFIG" --workdir="$WORKDIR" --coordinator_address="$HEAD:$PORT"
       --num_processes="$SLURM_NTASKS" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
# Single quotes: SLURM_PROCID is read inside each task, not here.
task="cd $(quote "$REPO") && exec $(quote "$VENV/bin/python") -m saejax.train $(quote_all "${flags[@]}") --process_id=\$SLURM_PROCID"
cmd=(srun --kill-on-bad-exit=1 --label bash -c "$task")

echo "saejax: job $SLURM_JOB_ID, $SLURM_NTASKS processes on ${SLURM_NNODES:-?} nodes," \
     "coordinator $HEAD:$PORT, workdir $WORKDIR" >&2
if ((DRY_RUN)); then
  quote_all "${cmd[@]}"; printf '\n'
else
  "${cmd[@]}"
fi
