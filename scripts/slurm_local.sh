#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, so that the sbatch test
# (tests/test_pipeline_e2e.py) submits slurm/train_lbmrc.sh for real instead of skipping.
#
#   bash scripts/slurm_local.sh [start]   install slurm-wlm and munge (Debian/Ubuntu, as
#                                          root), write /etc/slurm/slurm.conf, start munged,
#                                          slurmctld and slurmd, wait until the node is idle
#   bash scripts/slurm_local.sh stop      stop the three daemons again
#
# Exit status 3 (nothing changed) where it cannot run: not root, or no apt-get. .ci/run
# then skips the Slurm test with this script's message; anything else that fails is an error.
set -euo pipefail
# The daemons and runuser live in sbin, which a non-root or non-login shell's PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

NODE=$(hostname -s)
CPUS=2  # the sbatch script's 2 tasks x 1 CPU
CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm

stop() {
  # Each daemon by the pid file it wrote (never by name: other processes may match).
  for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
}

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null || true; }

start() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "slurm_local.sh: needs root to install and start Slurm (uid $(id -u)); not starting it" >&2
    exit 3
  fi
  if ! command -v apt-get >/dev/null; then
    echo "slurm_local.sh: needs apt-get (Debian/Ubuntu) to install slurm-wlm and munge; not starting it" >&2
    exit 3
  fi
  if command -v sinfo >/dev/null && [ "$(node_state)" = idle ]; then
    echo "slurm_local.sh: node $NODE is already up and idle"
    return
  fi
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  fi

  # munge authenticates every Slurm message; its key is made once per machine.
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1 || runuser -u munge -- munged

  # One node, one partition, no accounting and no cgroups (containers rarely allow
  # them): processes are tracked by their parent pid. config_overrides keeps the node
  # usable where the machine reports other CPU counts than the file.
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
# A requeued job may start again once its credentials expired (default 120 s): 30 s
# keeps the requeue test short and leaves a loaded machine time to launch a step.
AuthInfo=cred_expire=30
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null || slurmctld
  [ -s /run/slurmd.pid ] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null || slurmd

  for _ in $(seq 60); do
    if [ "$(node_state)" = idle ]; then
      echo "slurm_local.sh: node $NODE idle ($CPUS CPUs, partition local)"
      return
    fi
    sleep 1
  done
  echo "slurm_local.sh: node $NODE did not become idle within 60 s; state: '$(node_state)'" >&2
  tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
  exit 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
