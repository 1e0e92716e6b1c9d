#!/usr/bin/env bash
# Stop what slurm/dev/start-cluster.sh started (by the pids it recorded), cancelling any job left first.
set -uo pipefail
STATE=$(realpath -m "${1:-${HEADCT_SLURM_STATE:-/tmp/headct-slurm}}")
export SLURM_CONF="$STATE/slurm.conf"
[ -f "$SLURM_CONF" ] && scancel --full --user "$(id -un)" 2>/dev/null
for daemon in slurmd slurmctld munged; do
  pidfile="$STATE/run/$daemon.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
done
echo "headct-dev Slurm stopped ($STATE)"
