#!/bin/bash
# Alternating runs at the server's maximum rate: agent off, the prototype (exp), servescope (agent).
# Prints per run: req/s, wrk p99, BPF ns and program runs per request (bpf_stats, programs named ss_*),
# and the syscall cost to an untraced process (sysloop) while that mode is loaded.
#   URL=http://127.0.0.1:8080/predictions/echo TARGETS="<pids>" AGENT_ARGS="" ./compare.sh
# Needs: make (builds ./loader), wrk, bpftool, a release servescope (cargo xtask build --release).
set -u
cd "$(dirname "$0")"
REPS=${REPS:-6}; DUR=${DUR:-5}; CONNS=${CONNS:-8}; WARMUP=${WARMUP:-10}
AGENT=${AGENT:-../../../target/release/servescope}
: "${URL:?}" "${TARGETS:?}"
sysctl -qw kernel.bpf_stats_enabled=1
trap 'sysctl -qw kernel.bpf_stats_enabled=0' EXIT
stats() { bpftool prog show -j | python3 -c 'import json,sys
t=c=0
for p in json.load(sys.stdin):
    if p.get("name","").startswith("ss_"): t+=p.get("run_time_ns",0); c+=p.get("run_cnt",0)
print(t,c)'; }
start() { case $1 in
  exp) ./loader $TARGETS 2>/tmp/exp.err & echo $! > /tmp/mode.pid; sleep 1.5;;
  agent) $AGENT --listen 127.0.0.1:18099 ${AGENT_ARGS:-} >/tmp/agent.out 2>&1 & echo $! > /tmp/mode.pid; sleep 2.5;;
  off) : ;; esac; }
stopm() { [ "$1" = off ] || { kill -INT "$(cat /tmp/mode.pid)"; wait "$(cat /tmp/mode.pid)" 2>/dev/null; }; }
wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s bench.lua "$URL" >/dev/null
for r in $(seq 1 "$REPS"); do
  case $((r % 3)) in 0) order="off exp agent";; 1) order="exp agent off";; 2) order="agent off exp";; esac
  for m in $order; do
    start $m
    read -r t0 c0 <<<"$(stats)"
    out=$(wrk -t1 -c"$CONNS" -d"${DUR}s" -s bench.lua "$URL" | grep ^RES)
    read -r t1 c1 <<<"$(stats)"
    tax=$(./sysloop)
    stopm $m
    set -- $out
    # Off: nothing of ours is loaded (a just-stopped mode's programs may still be going away).
    [ $m = off ] && { t1=$t0; c1=$c0; }
    echo "rep=$r mode=$m rps=$(( $2 * 1000000 / $3 )) p99_us=$4 bpf_ns_per_req=$(( (t1 - t0) / $2 )) runs_per_req=$(( (c1 - c0) * 10 / $2 ))e-1 $tax"
  done
done
