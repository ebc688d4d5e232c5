#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on localhost for tests/workflow/test_slurm.py.
#
# Debian/Ubuntu, run as root (no sudo): installs `slurm-wlm` and `munge`, writes /etc/slurm/slurm.conf for this
# host (2 CPUs, memory from `free`), starts munged, slurmctld and slurmd, and waits until `sinfo` shows the node
# idle. There is no accounting daemon, so job status comes from `squeue` (MinJobAge keeps finished jobs visible).
# Idempotent: running it again reuses what is installed and running.
#
#   bash .ci/setup_slurm.sh          # then: pytest -m slurm tests/workflow/test_slurm.py
set -euo pipefail

log() { echo "[setup_slurm] $*"; }

if [ "$(id -u)" != 0 ]; then
    echo "[setup_slurm] must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for a concurrent apt/dpkg (CI images often run one at start-up) instead of failing at once.
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

NODE="$(hostname -s)"
CPUS=2
# Leave some memory to the OS; slurmd refuses to register a node that claims more memory than it has.
REAL_MEM=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 ))

# --- munge: the authentication SLURM's daemons and clients use -------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n | unmunge >/dev/null

# --- slurm.conf: one node, one partition, no accounting ---------------------------------------------------
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
cat > /etc/slurm/slurm.conf <<CONF
# Written by .ci/setup_slurm.sh: a single-node cluster on localhost for dinoflow's tests.
ClusterName=dinoflow
SlurmctldHost=${NODE}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups in containers: track processes through /proc and bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# No slurmdbd: status comes from squeue, so finished jobs must stay visible long enough (>= 120 s).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
ReturnToService=2
# Trust this file over the detected hardware (CI runners differ in sockets/cores; the test needs 2 CPUs).
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
MpiDefault=none
SlurmdTimeout=300
InactiveLimit=0
KillWait=30
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${REAL_MEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
log "wrote /etc/slurm/slurm.conf (node ${NODE}, ${CPUS} CPUs, ${REAL_MEM} MB)"

# --- daemons ------------------------------------------------------------------------------------------------
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    log "starting slurmctld"
    slurmctld
else
    log "slurmctld already running: re-reading slurm.conf"
    scontrol reconfigure
fi
if ! pgrep -x slurmd >/dev/null; then
    log "starting slurmd"
    slurmd
fi

log "waiting for node ${NODE} to be idle"
for i in $(seq 60); do
    state="$(sinfo -h -n "${NODE}" -o %T 2>/dev/null | head -n1 || true)"
    case "${state}" in
        idle|mixed|allocated) log "node ${NODE} is ${state}"; sinfo; exit 0 ;;
        down*|drain*|unknown*) scontrol update NodeName="${NODE}" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "[setup_slurm] node ${NODE} did not become idle; last state: '${state}'" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
