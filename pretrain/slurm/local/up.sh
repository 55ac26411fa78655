#!/usr/bin/env bash
# Start a throw-away one-node SLURM cluster on this machine (munged + slurmctld + slurmd), for the
# test suite and for trying `pretrain submit` without a real cluster.
#
#   bash slurm/local/up.sh [DIR]            # default DIR: $SLURM_LOCAL_DIR or /tmp/pretrain-slurm
#   export SLURM_CONF=DIR/etc/slurm.conf    # every client command (sbatch, squeue, ...) needs it
#   bash slurm/local/down.sh [DIR]          # stop the daemons (by the PIDs in DIR/run)
#
# Everything lives under DIR: config, munge key and socket, spool, logs, pid files. Debian's
# `slurmctld slurmd slurm-client munge` packages are installed when missing and we are root.
# Environment knobs: SLURM_LOCAL_PORT (slurmctld port, slurmd uses the next one; default 6817),
# SLURM_LOCAL_CPUS (default: nproc).
#
# Choices that matter on CI machines (containers without systemd or usable cgroups):
# - proctrack/linuxproc + task/none: no cgroups needed;
# - NodeName=localhost and `slurmd -N localhost`: independent of the machine's host name;
# - the munge socket's folder is mode 755 and every folder above DIR is a+x (not e.g. under a
#   mode-700 home or pytest tmp folder), or munged fails with "Socket is inaccessible";
# - cred_expire=5: a requeued job waits cred_expire seconds (default 120) before it may run again;
#   sched_interval=1 makes the scheduler pick it up within a second after that.
set -euo pipefail

D=$(realpath -m "${1:-${SLURM_LOCAL_DIR:-/tmp/pretrain-slurm}}")
PORT=${SLURM_LOCAL_PORT:-6817}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}

missing=0
for tool in slurmctld slurmd sbatch munged mungekey; do
  command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null || missing=1
done
if [ "$missing" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "slurm/local/up.sh: SLURM or munge is not installed and we are not root; install them with" >&2
    echo "  apt-get install --no-install-recommends slurmctld slurmd slurm-client munge" >&2
    exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

if [ -s "$D/run/slurmctld.pid" ] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null; then
  echo "slurm/local/up.sh: a cluster is already running in $D (stop it with slurm/local/down.sh $D)" >&2
  exit 1
fi
mkdir -p "$D"/{etc,log,run,spool/ctld,spool/d,munge}
chmod 755 "$D" "$D/munge"

# munge: our own key, socket, pid and log, run as the current user.
[ -s "$D/munge/munge.key" ] || mungekey --create --keyfile="$D/munge/munge.key"
chmod 400 "$D/munge/munge.key"
SOCKET="$D/munge/munge.socket.2"
munged --key-file="$D/munge/munge.key" --socket="$SOCKET" --pid-file="$D/run/munged.pid" \
  --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
munge --socket="$SOCKET" -n | unmunge --socket="$SOCKET" >/dev/null

USER_NAME=$(id -un)
MEMORY_MB=$(awk '/MemTotal/ {m = int($2 / 1024) - 1024; print (m > 512 ? m : 512)}' /proc/meminfo)
cat >"$D/etc/slurm.conf" <<CONF
# Written by slurm/local/up.sh: a one-node test cluster living in $D.
ClusterName=pretrain-local
SlurmctldHost=localhost
SlurmUser=$USER_NAME
SlurmdUser=$USER_NAME
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=5
MailProg=/bin/true
StateSaveLocation=$D/spool/ctld
SlurmdSpoolDir=$D/spool/d
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=localhost CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$D/etc/slurm.conf"

slurmctld -c -f "$SLURM_CONF"  # -c: cold start, no state from an earlier cluster
slurmd -f "$SLURM_CONF" -N localhost

for _ in $(seq 1 120); do
  if sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.25
done
echo "slurm/local/up.sh: the node did not become idle in 30 s; logs in $D/log" >&2
sinfo -N >&2 || true
exit 1
