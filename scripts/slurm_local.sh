#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the cluster tests (tests/test_slurm.py) and for trying
# `hydra/launcher=submitit_slurm` without a cluster:
#   scripts/slurm_local.sh start    # install (apt-get, once), write a tiny slurm.conf, start munged, slurmctld, slurmd;
#                                   # wait until `sinfo` shows the node idle
#   scripts/slurm_local.sh status   # exit 0 when the node answers idle/mixed/allocated
#   scripts/slurm_local.sh stop     # stop the three daemons that `start` started
# Needs root (apt-get, daemons). Idempotent: `start` on a running SLURM only checks it. One partition `debug`
# (the default), one node (this machine, `hostname -s`) with LTBENCH_SLURM_CPUS CPUs (default 2), no GPUs, no accounting daemon (sacct
# does not answer: submitit warns and reads its result files instead). An existing /etc/slurm/slurm.conf that this
# script did not write is never overwritten: `start` refuses instead.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARK="# written by ltbench scripts/slurm_local.sh"
STATE=/var/lib/ltbench-slurm
CPUS="${LTBENCH_SLURM_CPUS:-2}"
# the node is this machine under its own name: a node list must resolve (torch.distributed connects to its first node)
NODE="$(hostname -s)"

log() { echo "slurm_local: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    return
  fi
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    log "$CONF exists and was not written by this script: not touching it"
    exit 3
  fi
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log"
  local host
  host="$(hostname -s)"
  cat >"$CONF" <<EOF
$MARK
ClusterName=ltbench
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
# seconds between SIGTERM and SIGKILL at a time limit or a cancel (submitit asks for its --signal earlier)
KillWait=15
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmd finds the cgroup version itself (proctrack/linuxproc and task/none use no cgroup); a cgroup.conf left by
  # an earlier version of this script goes.
  if [ -f "$CONF_DIR/cgroup.conf" ] && grep -qF "$MARK" "$CONF_DIR/cgroup.conf"; then rm -f "$CONF_DIR/cgroup.conf"; fi
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  [ -f /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || \
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
}

node_state() { { sinfo -h -n "$NODE" -o '%T' 2>/dev/null || true; } | head -1 | tr -d '*~#'; }

is_up() { case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac }

start() {
  install_packages
  write_conf
  start_munge
  pgrep -x slurmctld >/dev/null || { log "starting slurmctld"; /usr/sbin/slurmctld; }
  pgrep -x slurmd >/dev/null || { log "starting slurmd"; /usr/sbin/slurmd -N "$NODE"; }
  for _ in $(seq 1 60); do
    if is_up; then
      log "node $NODE is $(node_state)"
      return 0
    fi
    case "$(node_state)" in down | drained | draining | fail) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;; esac
    sleep 1
  done
  log "node $NODE did not become idle (state: $(node_state)); logs in $STATE/log"
  tail -n 5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  return 1
}

stop_pid() {
  local name=$1 pidfile=$2
  [ -f "$pidfile" ] || return 0
  local pid
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $name ($pid)"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "$name ($pid) did not stop: SIGKILL"; kill -9 "$pid"; }
  fi
  rm -f "$pidfile"
}

stop() {
  [ -f "$CONF" ] && grep -qF "$MARK" "$CONF" || { log "no SLURM of this script's to stop"; return 0; }
  scancel --quiet --partition=debug 2>/dev/null || true
  stop_pid slurmd "$STATE/slurmd.pid"
  stop_pid slurmctld "$STATE/slurmctld.pid"
  stop_pid munged /run/munge/munged.pid
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) is_up ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
