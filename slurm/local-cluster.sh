#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying and testing the sbatch scripts.
#
#   bash slurm/local-cluster.sh (as root)     # install if missing, configure, start; idempotent
#   sbatch -n 2 slurm/ring_attention.sbatch --seq 4096 --causal
#
# Debian/Ubuntu, as root. Installs slurm-wlm, munge and PMIx (for srun --mpi=pmix) with apt
# when missing; writes /etc/slurm/slurm.conf for this host (its name, CPUs and memory as
# `slurmd -C` sees them, one partition "local"); starts munged, slurmctld and slurmd if they
# are not running; waits until the node is idle. Running it again changes nothing that works.
# Not for production: no accounting, no cgroups (proctrack/linuxproc, task/affinity),
# daemons run as root.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "local-cluster.sh: run as root (it installs packages and starts daemons)" >&2
  exit 1
fi

# 1. packages
missing=()
command -v munged >/dev/null || missing+=(munge)
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
# Slurm's pmix plugin loads libpmix.so at run time (the -dev package holds that name)
[ -e /usr/lib/x86_64-linux-gnu/libpmix.so ] || [ -n "$(ls /usr/lib/*/libpmix.so 2>/dev/null)" ] \
  || missing+=(libpmix2 libpmix-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. munge: the key the package made (or a new one), its daemon as the munge user
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# 3. slurm.conf for this host, as `slurmd -C` sees it (name, CPUs, sockets, memory)
host=$(hostname -s)
node=$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$host/")
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
conf=$(cat <<EOF
# written by slurm/local-cluster.sh: one node, this host
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$node State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=no
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
  printf '%s\n' "$conf" > /etc/slurm/slurm.conf
  changed=yes
fi

# 4. the daemons: start those not running; a changed configuration is re-read
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if running /run/slurmctld.pid; then
  [ "$changed" = no ] || scontrol reconfigure
else
  slurmctld
fi
running /run/slurmd.pid || slurmd

# 5. wait for the node; a node that was down (an earlier run, a reboot) goes back to work
for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle*|mixed*|allocated*|completing*) break ;;
    down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
sinfo
case "$state" in
  idle*|mixed*|allocated*|completing*) echo "local Slurm cluster ready: node $host ($state)" ;;
  *) echo "local-cluster.sh: node $host is '$state'; see /var/log/slurm/" >&2; exit 1 ;;
esac
