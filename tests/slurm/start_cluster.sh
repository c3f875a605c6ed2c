#!/usr/bin/env bash
# A one-node SLURM cluster on localhost (CPU only) for tests/slurm: installs Debian's slurm and munge
# if missing, writes a minimal slurm.conf and starts munged, slurmctld and slurmd with pid files
# under $SLURM_TEST_DIR (default /tmp/redi-slurm). Stop it with tests/slurm/stop_cluster.sh.
set -euo pipefail
DIR=${SLURM_TEST_DIR:-/tmp/redi-slurm}
mkdir -p "$DIR"/{state,spool,log,munge}

if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null \
   && SLURM_CONF="$DIR/slurm.conf" sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|alloc"; then
  echo "slurm is already up; export SLURM_CONF=$DIR/slurm.conf"
  exit 0
fi

if ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurmd slurmctld slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmd slurmctld slurm-client munge >"$DIR/log/apt.log" 2>&1 \
    || { apt-get update -q >>"$DIR/log/apt.log" 2>&1 && \
         apt-get install -y -q slurmd slurmctld slurm-client munge >>"$DIR/log/apt.log" 2>&1; } \
    || { echo "apt-get could not install slurm (see $DIR/log/apt.log)"; tail -5 "$DIR/log/apt.log"; exit 3; }
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
USER_NAME=$(id -un)

# munge: one key, its own socket and pid file
if [ ! -f "$DIR/munge/munge.key" ]; then
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 700 "$DIR/munge"; chmod 400 "$DIR/munge/munge.key"
if [ "$USER_NAME" = root ]; then chown -R root "$DIR/munge"; fi
MUNGE_SOCKET="$DIR/munge/munge.socket"
munged --key-file "$DIR/munge/munge.key" --socket "$MUNGE_SOCKET" --pid-file "$DIR/munge/munged.pid" \
  --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/munge.seed" --force

cat >"$DIR/slurm.conf" <<CONF
ClusterName=redi-test
SlurmctldHost=$HOST
SlurmUser=$USER_NAME
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=86400
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$DIR/slurm.conf"
# job steps (srun inside sbatch) look for the default path: link it there unless a real cluster's
# config is already installed
if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$SLURM_CONF" ]; then
  mkdir -p /etc/slurm && ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
else
  echo "note: /etc/slurm/slurm.conf belongs to another cluster; job steps need SLURM_CONF=$SLURM_CONF"
fi
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

for _ in $(seq 1 30); do
  if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|alloc"; then
    echo "slurm is up: node $HOST, $CPUS CPUs, ${MEM_MB} MB; export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "slurmd did not come up; last log lines:"
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" 2>/dev/null || true
sinfo 2>&1 || true
exit 4
