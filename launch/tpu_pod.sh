#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: creates it (or reuses it), installs this checkout on every
# worker, and starts `python -m adv_soups.train` on all workers at once (--worker=all).
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN [flags] [-- OVERRIDES]
#
# Flags (--flag=value):
#   --name              TPU VM (and queued resource) name. Required.
#   --zone              GCP zone, e.g. us-central2-b. Required.
#   --workdir           gs:// directory for config.json, checkpoints and metrics (every worker
#                       writes there: it must be shared storage). Required.
#   --config            training config file (default configs/imagenet_vit_b16.py).
#   --accelerator_type  TPU type and size (default v4-32: 4 hosts x 4 chips).
#   --runtime_version   TPU VM software version (default tpu-ubuntu2204-base).
#   --project           GCP project (default: gcloud's configured one).
#   --spot              spot (preemptible) capacity: cheaper, may be taken away (SIGTERM, ~30 s).
#   --queued            request the slice through queued resources (waits for capacity).
#   --relaunch          after a preemption (exit status 75, or the TPU gone) recreate / rerun until
#                       WORKDIR/FINISHED exists; the same command resumes from the last checkpoint.
#   --max_relaunches    give up after this many relaunches (default 20).
#   --python            interpreter on the workers (default python3).
#   --delete            delete the TPU VM when the run has finished.
#   --dry_run           print the gcloud commands instead of running them.
# OVERRIDES after -- go to every worker's adv_soups.train unchanged, e.g.
#   -- --config.train.steps=90000 --config.data.data_dir=gs://BUCKET/tensorflow_datasets
# JAX finds the other workers itself on a TPU VM (adv_soups.parallel.initialize auto-detects it).
set -u -o pipefail

fail() { echo "launch/tpu_pod.sh: $*" >&2; exit 2; }
usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }

NAME=""; ZONE=""; WORKDIR=""; CONFIG="configs/imagenet_vit_b16.py"; TYPE="v4-32"
VERSION="tpu-ubuntu2204-base"; PROJECT=""; SPOT=0; QUEUED=0; RELAUNCH=0; MAX_RELAUNCHES=20
PY="python3"; DELETE=0; DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --accelerator_type=*) TYPE="${1#*=}" ;;
    --runtime_version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --relaunch) RELAUNCH=1 ;;
    --max_relaunches=*) MAX_RELAUNCHES="${1#*=}" ;;
    --python=*) PY="${1#*=}" ;;
    --delete) DELETE=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) fail "unknown flag '$1' (see the top of launch/tpu_pod.sh; config overrides go after --)" ;;
  esac
  shift
done
OVERRIDES=("$@")
[[ -n "$NAME" ]] || fail "--name is required (the TPU VM's name)"
[[ -n "$ZONE" ]] || fail "--zone is required, e.g. --zone=us-central2-b"
[[ "$WORKDIR" == gs://* ]] || fail "--workdir must be gs://BUCKET/PATH (all workers write there), got '$WORKDIR'"
[[ "$MAX_RELAUNCHES" =~ ^[0-9]+$ ]] || fail "--max_relaunches must be an integer >= 0, got '$MAX_RELAUNCHES'"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
[[ $DRY_RUN -eq 1 || -f "$HERE/$CONFIG" ]] || fail "no config file '$CONFIG' in $HERE"

COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")
TARBALL="/tmp/adv_soups-$NAME.tar.gz"
REMOTE_DIR="adv_soups"

# One word for a shell: as is when plain, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Prints a command (shell-quoted, one line) with --dry_run; runs it otherwise.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    local out="" word
    for word in "$@"; do out+="$(quote "$word") "; done
    echo "${out% }"
    return 0
  fi
  "$@"
}

tpu_exists() {
  [[ $DRY_RUN -eq 1 ]] && return 1
  gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}" --format='value(state)' 2>/dev/null \
    | grep -q -E 'READY|CREATING|STARTING'
}

create_tpu() {
  local spot=()
  [[ $SPOT -eq 1 ]] && spot=(--spot)
  if [[ $QUEUED -eq 1 ]]; then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${COMMON[@]}" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" "${spot[@]}"
    if [[ $DRY_RUN -eq 1 ]]; then
      echo "# then wait until: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE reports ACTIVE"
    else
      until gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}" \
          --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done
    fi
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" "${spot[@]}"
  fi
}

delete_tpu() {
  if [[ $QUEUED -eq 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
  fi
}

install() {
  # This checkout (without virtual environments, workdirs and caches) onto every worker.
  run tar -czf "$TARBALL" -C "$HERE" --exclude=./.venv* --exclude=./workdirs --exclude=.git \
    --exclude=__pycache__ .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:adv_soups.tar.gz" "${COMMON[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all \
    --command="mkdir -p $REMOTE_DIR && tar -xzf adv_soups.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && $PY -m pip install -q -U pip && $PY -m pip install -q -e . 'jax[tpu]'"
}

train_command() {
  local words=(cd "$REMOTE_DIR" "&&" "$PY" -m adv_soups.train "--config=$CONFIG" "--workdir=$WORKDIR")
  local out="" word
  for word in "${words[@]:0:3}"; do out+="$word "; done
  for word in "${words[@]:3}" "${OVERRIDES[@]}"; do out+="$(quote "$word") "; done
  echo "${out% }"
}

start_training() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all \
    --command="$(train_command)"
}

finished() {
  [[ $DRY_RUN -eq 1 ]] && return 1
  gcloud storage ls "$WORKDIR/FINISHED" >/dev/null 2>&1
}

tpu_exists || create_tpu
install
attempt=0
while true; do
  start_training; rc=$?
  if [[ $DRY_RUN -eq 1 ]]; then
    [[ $RELAUNCH -eq 1 ]] && echo "# --relaunch: while the exit status is 75 (preempted) or the TPU is gone, recreate it if needed and rerun the line above, until this succeeds:" && run gcloud storage ls "$WORKDIR/FINISHED"
    break
  fi
  if finished; then echo "launch/tpu_pod.sh: $WORKDIR is finished"; break; fi
  if [[ $RELAUNCH -eq 0 ]]; then
    echo "launch/tpu_pod.sh: training stopped with status $rc before $WORKDIR/FINISHED exists" >&2
    exit "$rc"
  fi
  attempt=$((attempt + 1))
  if [[ $attempt -gt $MAX_RELAUNCHES ]]; then
    echo "launch/tpu_pod.sh: giving up after $MAX_RELAUNCHES relaunches (last status $rc)" >&2
    exit 1
  fi
  # 75 = preempted (every worker saved a checkpoint); 255 = ssh lost (a spot TPU taken away).
  if [[ $rc -ne 75 && $rc -ne 255 ]]; then
    echo "launch/tpu_pod.sh: training failed with status $rc (not a preemption): not relaunching" >&2
    exit "$rc"
  fi
  echo "launch/tpu_pod.sh: preempted (status $rc): relaunch $attempt of $MAX_RELAUNCHES" >&2
  if ! tpu_exists; then
    delete_tpu 2>/dev/null
    create_tpu
    install
  fi
done
[[ $DELETE -eq 1 ]] && delete_tpu
exit 0
