#!/usr/bin/env bash
# A single-node Slurm for the tests and for trying the templates on one machine: writes slurm.conf, starts munged,
# `slurmctld -D` and `slurmd -D` in the background (foreground mode, no systemd), and waits for the node to be idle.
# Everything lives under one state folder; nothing in /etc is changed. Needs Debian's `slurm-wlm` and `munge`.
#
#   slurm/dev/start-cluster.sh [STATE_DIR]      # default: /tmp/headct-slurm
#   export SLURM_CONF=STATE_DIR/slurm.conf       # then sbatch, squeue, scontrol, srun talk to this cluster
#   slurm/dev/stop-cluster.sh [STATE_DIR]
#
# No cgroups (containers and CI machines rarely delegate them): ProctrackType=proctrack/linuxproc (the step's
# processes are found by parent pid), TaskPlugin=task/none, no accounting database. The node declares
# HEADCT_SLURM_CPUS CPUs (default 4, more than a small CI machine has, so two tasks of two CPUs fit; slurmd is told to
# trust the file: SlurmdParameters=config_overrides). Ports: HEADCT_SLURM_PORT (slurmctld) and the next one (slurmd),
# default 16817/16818, away from a real installation's 6817/6818.
set -euo pipefail
STATE=$(realpath -m "${1:-${HEADCT_SLURM_STATE:-/tmp/headct-slurm}}")
CPUS=${HEADCT_SLURM_CPUS:-4}
PORT=${HEADCT_SLURM_PORT:-16817}
NODE=$(hostname -s)
USER_NAME=$(id -un)
for tool in munged mungekey slurmctld slurmd scontrol sinfo; do
  command -v "$tool" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin
  command -v "$tool" >/dev/null 2>&1 || { echo "start-cluster: $tool not found (apt-get install slurm-wlm munge)" >&2; exit 3; }
done
mkdir -p "$STATE"/{munge,ctld,spool,log,run}
chmod 700 "$STATE/munge"

# munge: a key of our own and a socket in STATE (munged refuses a group/world-writable path and, as root, needs -f).
[ -f "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key" >/dev/null
chmod 600 "$STATE/munge/munge.key"
SOCKET="$STATE/munge/munge.socket.2"
if ! [ -S "$SOCKET" ] || ! munge -n -S "$SOCKET" >/dev/null 2>&1; then
  munged --force --key-file="$STATE/munge/munge.key" --socket="$SOCKET" --pid-file="$STATE/run/munged.pid" \
    --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
fi

cat > "$STATE/slurm.conf" <<CONF
# written by slurm/dev/start-cluster.sh: a one-node development cluster, no cgroups
ClusterName=headct-dev
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$USER_NAME
SlurmdUser=$USER_NAME
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
SchedulerParameters=defer_batch
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
: > "$STATE/cgroup.conf"  # read by some plugins even when unused; empty = defaults
export SLURM_CONF="$STATE/slurm.conf"

running() { [ -f "$STATE/run/$1.pid" ] && kill -0 "$(cat "$STATE/run/$1.pid")" 2>/dev/null; }
if ! running slurmctld; then
  slurmctld -D -i -f "$SLURM_CONF" >"$STATE/log/slurmctld.out" 2>&1 &
  echo $! > "$STATE/run/slurmctld.pid"
fi
if ! running slurmd; then
  slurmd -D -N "$NODE" -f "$SLURM_CONF" >"$STATE/log/slurmd.out" 2>&1 &
  echo $! > "$STATE/run/slurmd.pid"
fi

# Wait (up to HEADCT_SLURM_WAIT s) until the node is idle; print the daemons' last words otherwise.
for _ in $(seq 1 "${HEADCT_SLURM_WAIT:-60}"); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  if [ "$state" = "idle" ]; then echo "headct-dev Slurm up: SLURM_CONF=$SLURM_CONF (node $NODE, $CPUS CPUs)"; exit 0; fi
  for daemon in slurmctld slurmd; do
    running "$daemon" || { echo "start-cluster: $daemon exited:" >&2; tail -20 "$STATE/log/$daemon.out" "$STATE/log/$daemon.log" >&2 2>/dev/null; exit 4; }
  done
  sleep 1
done
echo "start-cluster: node $NODE not idle after ${HEADCT_SLURM_WAIT:-60} s (state: ${state:-unknown})" >&2
tail -20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 2>/dev/null || true
exit 4
