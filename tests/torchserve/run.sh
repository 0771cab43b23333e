#!/usr/bin/env bash
# Start TorchServe (installed by setup.sh) in the background with the models
# echo, slow and fail registered (1 worker each), and wait until it is ready.
#
# Usage: run.sh [TS_HOME]      (same TS_HOME rules as setup.sh)
#
# Each start begins with an EMPTY $TS_HOME/logs (old logs are deleted), so
# counters and logs always describe one run.
# Readiness: first the log must show all three workers in WORKER_MODEL_LOADED
# (no HTTP traffic involved), then GET /ping is sent until it answers 200
# "Healthy" -- normally exactly once, so a fresh run starts with
# Requests2XX = 1. The Java PID is written to $TS_HOME/torchserve.pid.
# Env: READY_TIMEOUT (seconds, default 180).
set -euo pipefail

TS_HOME="${1:-${TS_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/torchserve}}"
[ -d "$TS_HOME/venv" ] || { echo "[run] $TS_HOME not set up; run setup.sh first" >&2; exit 1; }
TS_HOME="$(cd "$TS_HOME" && pwd)"
PY="$TS_HOME/venv/bin/python"
PIDFILE="$TS_HOME/torchserve.pid"
READY_TIMEOUT="${READY_TIMEOUT:-180}"
MODELS=(echo slow fail)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }

is_ours() {  # pid -> 0 if it is a live TorchServe frontend
    [ -n "${1:-}" ] && [ -r "/proc/$1/cmdline" ] &&
        tr '\0' ' ' <"/proc/$1/cmdline" | grep -q 'org.pytorch.serve.ModelServer'
}

if [ -f "$PIDFILE" ] && is_ours "$(cat "$PIDFILE")"; then
    echo "[run] already running, pid $(cat "$PIDFILE") (use stop.sh first)" >&2
    exit 1
fi
rm -f "$PIDFILE"

# Refuse to start if a port is taken (another TorchServe or anything else).
"$PY" - <<'EOF'
import socket, sys
busy = []
for port in (8080, 8081, 8082, 7070, 7071):
    s = socket.socket()
    s.settimeout(0.5)
    if s.connect_ex(("127.0.0.1", port)) == 0:
        busy.append(port)
    s.close()
if busy:
    sys.exit("[run] port(s) already in use on 127.0.0.1: %s" % busy)
EOF

rm -rf "$TS_HOME/logs"
mkdir -p "$TS_HOME/logs" "$TS_HOME/tmp"
rm -f "$TS_HOME/tmp/.model_server.pid"

T=$(now)
cd "$TS_HOME"
# TMPDIR only moves torchserve's python-side pid file (.model_server.pid) into
# $TS_HOME/tmp; the JVM keeps java.io.tmpdir=/tmp, so the worker sockets stay
# at their default /tmp/.ts.sock.<port>.
TMPDIR="$TS_HOME/tmp" LOG_LOCATION="$TS_HOME/logs" METRICS_LOCATION="$TS_HOME/logs" \
    "$TS_HOME/venv/bin/torchserve" --start \
    --ts-config config.properties \
    --model-store model-store \
    --models echo=echo.mar slow=slow.mar fail=fail.mar \
    --ncs >"$TS_HOME/logs/stdout.log" 2>&1 </dev/null

JPID=""
for _ in $(seq 1 100); do
    if [ -s "$TS_HOME/tmp/.model_server.pid" ]; then
        JPID=$(cat "$TS_HOME/tmp/.model_server.pid")
        break
    fi
    sleep 0.1
done
if ! is_ours "$JPID"; then
    echo "[run] frontend did not start; see $TS_HOME/logs/stdout.log" >&2
    tail -20 "$TS_HOME/logs/stdout.log" >&2 || true
    exit 1
fi
echo "$JPID" >"$PIDFILE"
echo "[run] java frontend pid $JPID"

# Wait for every worker to load its model (log only, no HTTP requests).
deadline=$(( $(date +%s) + READY_TIMEOUT ))
while :; do
    loaded=$(grep -ho 'W-[0-9]*-[a-z]*_[0-9.]* State change WORKER_STARTED -> WORKER_MODEL_LOADED' \
        "$TS_HOME/logs/ts_log.log" 2>/dev/null | awk '{print $1}' | sort -u | wc -l || true)
    [ "$loaded" -ge "${#MODELS[@]}" ] && break
    if ! is_ours "$JPID"; then
        echo "[run] frontend exited; see $TS_HOME/logs" >&2; exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "[run] timeout waiting for workers ($loaded/${#MODELS[@]} loaded)" >&2; exit 1
    fi
    sleep 0.2
done
echo "[run] workers loaded ($(elapsed "$T"))"

# One /ping (repeated only if not yet healthy).
"$PY" - "$READY_TIMEOUT" <<'EOF'
import http.client, sys, time
deadline = time.time() + float(sys.argv[1])
tries = 0
while True:
    tries += 1
    try:
        c = http.client.HTTPConnection("127.0.0.1", 8080, timeout=5)
        c.request("GET", "/ping")
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        if r.status == 200 and "Healthy" in body:
            print("[run] /ping 200 Healthy after %d request(s)" % tries)
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("[run] /ping never became healthy")
    time.sleep(0.5)
EOF
echo "[run] ready in $(elapsed "$T"): inference :8080, management :8081, metrics :8082 (127.0.0.1)"
