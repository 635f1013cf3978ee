#!/usr/bin/env bash
# Runs N local processes of an adv_soups program with jax.distributed on CPU: pod behaviour
# (per-process data, one writer, collectives across processes, preemption) without a pod.
#
#   launch/local.sh N [--devices_per_process=K] [--module=adv_soups.train] -- FLAGS...
#
#   N                      processes to start (process ids 0..N-1), >= 1.
#   --devices_per_process  simulated CPU devices per process (XLA_FLAGS=
#                          --xla_force_host_platform_device_count=K); default 2.
#   --module               adv_soups.train (default), adv_soups.evaluate or adv_soups.sweep.
#   --port                 coordinator port on 127.0.0.1; default: a free one.
#   FLAGS                  passed unchanged to every process, e.g. --config=configs/digits.py
#                          --workdir=workdirs/pod_test --config.train.steps=50
#
# Each process gets ADV_SOUPS_COORDINATOR_ADDRESS / ADV_SOUPS_NUM_PROCESSES / ADV_SOUPS_PROCESS_ID
# (read by adv_soups.parallel.initialize). Process i's output is prefixed with "[i] ". SIGTERM or
# SIGINT to this script is forwarded to every process (a preemption drill). Exit status: 0 when all
# succeed; 75 when all stopped on a preemption (resume by running the same command); otherwise the
# first failing process's status. $PYTHON picks the interpreter (default .venv/bin/python, else
# python3).
set -u -o pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "launch/local.sh: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
[[ "$1" == -h || "$1" == --help ]] && { usage; exit 0; }
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || fail "N must be an integer >= 1, got '$N'"
DEVICES=2; MODULE=adv_soups.train; PORT=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --devices_per_process=*) DEVICES="${1#*=}" ;;
    --module=*) MODULE="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    *) fail "unknown option '$1' (allowed --devices_per_process=K, --module=M, --port=P; program flags go after --)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] && shift  # the --
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || fail "--devices_per_process must be an integer >= 1, got '$DEVICES'"
case "$MODULE" in
  adv_soups.train|adv_soups.evaluate|adv_soups.sweep|adv_soups.demo) ;;
  *) fail "unknown --module=$MODULE: allowed adv_soups.train, adv_soups.evaluate, adv_soups.sweep" ;;
esac
HERE="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

PIDS=()
forward() {
  for pid in "${PIDS[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < N; i++)); do
  (
    export ADV_SOUPS_COORDINATOR_ADDRESS="127.0.0.1:$PORT" ADV_SOUPS_NUM_PROCESSES="$N" \
           ADV_SOUPS_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
           XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
    # exec keeps the pid: a signal for this subshell reaches Python itself.
    exec "$PYTHON" -u -m "$MODULE" "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2)
  ) &
  PIDS+=("$!")
done

# Reap the processes in the order they end. When one fails, the others would wait for it in a
# collective: TERM them, and KILL what is left after $LOCAL_SH_GRACE seconds (default 30).
GRACE="${LOCAL_SH_GRACE:-30}"
STATUS=0; PREEMPTED=0; RUNNING=("${PIDS[@]}")
while [[ ${#RUNNING[@]} -gt 0 ]]; do
  done_pid=""
  wait -n -p done_pid "${RUNNING[@]}"; rc=$?
  [[ -z "${done_pid:-}" ]] && continue  # a trapped signal interrupted `wait`: wait again
  REST=(); for pid in "${RUNNING[@]}"; do [[ $pid != "$done_pid" ]] && REST+=("$pid"); done
  RUNNING=("${REST[@]}")
  if [[ $rc -eq 75 ]]; then PREEMPTED=$((PREEMPTED + 1))
  elif [[ $rc -ne 0 && $STATUS -eq 0 ]]; then
    STATUS=$rc
    echo "launch/local.sh: a process failed (status $rc): stopping the others" >&2
    forward TERM
    ( sleep "$GRACE"; for pid in "${RUNNING[@]}"; do kill -KILL "$pid" 2>/dev/null; done ) &
  fi
done
if [[ $STATUS -ne 0 ]]; then exit "$STATUS"; fi
if [[ $PREEMPTED -gt 0 ]]; then exit 75; fi
exit 0
