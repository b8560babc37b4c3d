#!/usr/bin/env bash
# A single-node SLURM cluster on localhost for the integration tests:
# munged, slurmctld and slurmd, all state, logs and sockets under STATE_DIR.
#
# Usage: tests/cluster/start_slurm.sh STATE_DIR
# Then:  export SLURM_CONF=STATE_DIR/slurm.conf   (sbatch, squeue, sacct read it)
# Stop:  tests/cluster/stop_slurm.sh STATE_DIR
#
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root,
# because slurmd starts job processes as the submitting user. No cgroups:
# proctrack/linuxproc and task/none work in containers without a cgroup mount.
# No slurmdbd: jobs are listed by squeue while queued or running and by
# `scontrol show job` for MinJobAge seconds after they end.
set -euo pipefail

STATE_DIR=$(mkdir -p "${1:?usage: start_slurm.sh STATE_DIR}" && cd "$1" && pwd)
for bin in munged slurmctld slurmd scontrol; do
  command -v "$bin" >/dev/null || { echo "start_slurm.sh: $bin not found (apt-get install slurm-wlm munge)" >&2; exit 3; }
done

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

mkdir -p "$STATE_DIR"/{ctld,spool,log,munge}
chmod 700 "$STATE_DIR/munge"

# munge: a private key and socket, so a system munged (if any) is untouched.
if [ ! -f "$STATE_DIR/munge/munge.key" ]; then
  dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$STATE_DIR/munge/munge.key"
fi
MUNGE_SOCKET="$STATE_DIR/munge/munge.socket"
munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE_DIR/munge/munge.key" \
  --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
  --seed-file="$STATE_DIR/munge/munged.seed"

read -r CPUS MEM < <(slurmd -C | awk '/NodeName/ {
  for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["CPUs"], v["RealMemory"] }')
CTLD_PORT=${SLURMCTLD_PORT:-$(free_port)}
SLURMD_PORT=${SLURMD_PORT:-$(free_port)}

cat > "$STATE_DIR/slurm.conf" <<CONF
ClusterName=ablaxtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: plain process tracking, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
MaxArraySize=1001
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$STATE_DIR/slurm.conf"
echo "export SLURM_CONF=$SLURM_CONF" > "$STATE_DIR/env.sh"
slurmctld -f "$SLURM_CONF" -i   # -i: ignore state left by an earlier start
slurmd -f "$SLURM_CONF" -N localhost

# Ready when the node is idle (slurmd registered with slurmctld).
for _ in $(seq 1 60); do
  if scontrol show node localhost 2>/dev/null | grep -qE 'State=IDLE'; then
    echo "slurm ready: SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "start_slurm.sh: node did not become idle; logs in $STATE_DIR/log" >&2
scontrol show node localhost >&2 || true
tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
exit 1
