#!/usr/bin/env bash
# Stop the cluster started by slurm/local/up.sh: cancel its jobs, then stop slurmd, slurmctld and
# munged, each by the PID in its pid file (never by process name, so other SLURM daemons on the
# machine are left alone).
# DIR (the same as for up.sh) is kept for its logs; `--rm` deletes it as well.
#
#   bash slurm/local/down.sh [DIR] [--rm]
set -u

remove=0
dir=""
for arg in "$@"; do
  case "$arg" in
    --rm) remove=1 ;;
    *) dir=$arg ;;
  esac
done
D=$(realpath -m "${dir:-${SLURM_LOCAL_DIR:-/tmp/pretrain-slurm}}")

export SLURM_CONF="$D/etc/slurm.conf" PATH="$PATH:/usr/sbin:/sbin"
if [ -s "$D/run/slurmctld.pid" ] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null; then
  scancel --user="$(id -un)" 2>/dev/null
  for _ in $(seq 1 60); do  # wait for running jobs to end (KillWait is 5 s)
    squeue -h -t RUNNING,COMPLETING 2>/dev/null | grep -q . || break
    sleep 0.25
  done
fi

for daemon in slurmd slurmctld munged; do
  pidfile="$D/run/$daemon.pid"
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  fi
  rm -f "$pidfile"
done
if [ "$remove" = 1 ]; then rm -rf "$D"; fi
exit 0
