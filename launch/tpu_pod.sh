#!/usr/bin/env bash
# Train saejax on a Cloud TPU pod slice: one process per TPU VM worker, all started together.
#
#   launch/tpu_pod.sh [options] STEP... [-- training flags]
#
# Steps, run in the order given (each is one command; --dry-run prints them instead):
#   create   gcloud compute tpus tpu-vm create (the slice: --accelerator, --version, --zone)
#   copy     git archive HEAD -> every worker's ~/saejax (the committed code: code_version.txt
#            in the workdir then names exactly what ran)
#   install  python venv + pip install -e '.[tpu]' on every worker
#   run      on every worker: a tmux session named after the run, whose first act is to write
#            its PID to ~/saejax-runs/RUN.pid; `python -m saejax.train` finds the other workers
#            by itself (saejax.train.distributed: Cloud TPU VM -> jax.distributed.initialize())
#   logs     follow worker 0's log (process 0 prints the metrics)
#   status   per worker: the run's session and PID, or that there is none
#   stop     SIGTERM to the recorded PID on every worker (the run checkpoints at one agreed step
#            and exits), then close the tmux session; never a kill by process name
#   delete   gcloud compute tpus tpu-vm delete
#
# Options: --name TPU --zone ZONE (required) [--project P] [--accelerator v4-32]
#   [--version tpu-ubuntu2204-base (v4 and older; v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5)]
#   [--spot] [--run NAME] [--config configs/base.py]
#   [--workdir gs://BUCKET/runs/NAME] [--log-worker 0] [--stop-wait 300] [--dry-run]
#
# Example (a v4-32: 4 workers x 4 chips):
#   launch/tpu_pod.sh --name sae-v4 --zone us-central2-b --accelerator v4-32 create copy install
#   launch/tpu_pod.sh --name sae-v4 --zone us-central2-b --run base1 --config configs/base.py \
#     --workdir gs://my-bucket/runs/base1 run logs
#   launch/tpu_pod.sh --name sae-v4 --zone us-central2-b --run base1 stop delete
# Extra training flags go after `--`:  ... run -- --config.sae.k=32
set -euo pipefail

NAME="" ZONE="" PROJECT="" ACCELERATOR="v4-32" VERSION="tpu-ubuntu2204-base" SPOT=0
RUN="" CONFIG="configs/base.py" WORKDIR="" DRY_RUN=0 LOG_WORKER=0 STOP_WAIT_S=300
STEPS=() TRAIN_ARGS=()

usage() {  # the comment block above
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"
}
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while (($#)); do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --run) RUN="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --log-worker) LOG_WORKER="$2"; shift 2 ;;
    --stop-wait) STOP_WAIT_S="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    create|copy|install|run|logs|stop|delete|status) STEPS+=("$1"); shift ;;
    *) echo "tpu_pod.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
done
((${#STEPS[@]})) || die "name at least one step (create copy install run logs stop delete status)"
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name and --zone are required"
[[ "$NAME$RUN" =~ ^[A-Za-z0-9._-]*$ ]] || die "--name and --run may hold only letters, digits, . _ -"

# One word for a POSIX shell: as is when safe, else in single quotes (like Python's shlex.quote).
quote() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local sep=""; for word in "$@"; do printf '%s' "$sep"; quote "$word"; sep=" "; done; }

# Every command goes through here: printed (one shell-quoted line) under --dry-run, run otherwise.
run() {
  if ((DRY_RUN)); then quote_all "$@"; printf '\n'; else "$@"; fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
RUNS_DIR='$HOME/saejax-runs'  # expanded on the worker, not here

ssh_workers() {  # ssh_workers WORKER COMMAND
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

need_run() { [[ -n "$RUN" ]] || die "step '$1' needs --run NAME (the tmux session and PID file)"; }

for step in "${STEPS[@]}"; do
  case "$step" in
    create)
      args=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR"
            --version="$VERSION")
      ((SPOT)) && args+=(--spot)
      run "${args[@]}" ;;
    copy)
      archive="/tmp/saejax-$NAME.tar.gz"
      run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
      run "${GCLOUD[@]}" scp "$archive" "$NAME:saejax.tar.gz" "${WHERE[@]}" --worker=all
      ssh_workers all "rm -rf ~/saejax && mkdir -p ~/saejax && tar xzf ~/saejax.tar.gz -C ~/saejax" ;;
    install)
      # saejax needs Python >= 3.11; the Ubuntu 22.04 TPU images ship 3.10 (apt has 3.11).
      python='PY=$(command -v python3.12 || command -v python3.11 || true); if [ -z "$PY" ]; then sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv && PY=python3.11; fi'
      pip='~/saejax-venv/bin/pip install -q'
      ssh_workers all "$python; \$PY -m venv ~/saejax-venv && $pip -U pip && $pip -e ~/saejax'[tpu]'" ;;
    run)
      need_run run
      [[ -n "$WORKDIR" ]] ||
        die "step 'run' needs --workdir (gs://BUCKET/runs/NAME, or /mnt/gcs/runs/NAME where the bucket is mounted on every worker: each writes checkpoints there)"
      flags=(--config="$CONFIG" --workdir="$WORKDIR" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
      train_q="\$HOME/saejax-venv/bin/python -m saejax.train $(quote_all "${flags[@]}")"
      # The session's shell writes its PID, then exec's the trainer (same PID): `stop` signals it.
      inner="echo \$\$ > $RUNS_DIR/$RUN.pid; cd ~/saejax; exec $train_q >> $RUNS_DIR/$RUN.log 2>&1"
      ssh_workers all "mkdir -p $RUNS_DIR && tmux new-session -d -s $RUN $(quote "$inner")" ;;
    logs)
      need_run logs
      ssh_workers "$LOG_WORKER" "tail -n 100 -F $RUNS_DIR/$RUN.log" ;;
    status)
      need_run status
      check="tmux has-session -t $RUN 2>/dev/null"
      check+=" && echo \"\$(hostname): running pid \$(cat $RUNS_DIR/$RUN.pid)\""
      check+=" || echo \"\$(hostname): no session $RUN\""
      ssh_workers all "$check" ;;
    stop)
      need_run stop
      # Only the recorded PID, and only if it is still this run's trainer (PIDs get reused).
      # Up to --stop-wait seconds for the checkpoint; then the session is closed either way.
      stop="pid=\$(cat $RUNS_DIR/$RUN.pid) && if grep -q saejax.train /proc/\$pid/cmdline 2>/dev/null"
      stop+="; then kill -TERM \$pid"
      stop+="; for i in \$(seq $STOP_WAIT_S); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; fi"
      stop+="; tmux kill-session -t $RUN 2>/dev/null || true"
      ssh_workers all "$stop" ;;
    delete)
      run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet ;;
  esac
done
