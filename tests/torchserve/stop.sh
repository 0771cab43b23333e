#!/usr/bin/env bash
# Stop the TorchServe started by run.sh (by its recorded PID only).
# Usage: stop.sh [TS_HOME]
# SIGTERM to the Java frontend (its shutdown hook stops the workers), wait up
# to 30 s, then SIGKILL; python workers still alive 10 s later are killed by
# the PIDs recorded before the stop.
set -euo pipefail

TS_HOME="${1:-${TS_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/torchserve}}"
[ -d "$TS_HOME" ] || { echo "[stop] no $TS_HOME" >&2; exit 0; }
TS_HOME="$(cd "$TS_HOME" && pwd)"
PIDFILE="$TS_HOME/torchserve.pid"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }
is_ours() {
    [ -n "${1:-}" ] && [ -r "/proc/$1/cmdline" ] &&
        tr '\0' ' ' <"/proc/$1/cmdline" | grep -q 'org.pytorch.serve.ModelServer'
}
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

if [ ! -f "$PIDFILE" ]; then
    echo "[stop] not running (no $PIDFILE)"
    exit 0
fi
JPID=$(cat "$PIDFILE")
if ! is_ours "$JPID"; then
    echo "[stop] pid $JPID is not a running TorchServe; removing stale pid file"
    rm -f "$PIDFILE" "$TS_HOME/tmp/.model_server.pid"
    exit 0
fi

T=$(now)
# Worker processes are direct children of the frontend.
WORKERS=$(ps -o pid= --ppid "$JPID" 2>/dev/null | tr -s ' \n' ' ' || true)
# The frontend may exit on its own between the check above and here (e.g. it got
# the same Ctrl-C); that is not an error.
kill -TERM "$JPID" 2>/dev/null || true
for _ in $(seq 1 300); do alive "$JPID" || break; sleep 0.1; done
if alive "$JPID"; then
    echo "[stop] frontend still alive after 30 s; SIGKILL"
    kill -KILL "$JPID" 2>/dev/null || true
fi
for _ in $(seq 1 100); do
    left=""
    for w in $WORKERS; do alive "$w" && left="$left $w"; done
    [ -z "$left" ] && break
    sleep 0.1
done
for w in ${left:-}; do
    echo "[stop] killing leftover worker $w"
    kill -KILL "$w" 2>/dev/null || true
done
rm -f "$PIDFILE" "$TS_HOME/tmp/.model_server.pid"
echo "[stop] stopped pid $JPID (workers:${WORKERS:- none}) in $(elapsed "$T")"
