#!/usr/bin/env bash
# Start a single-node SLURM (slurmctld + slurmd + munge) on this machine for the
# `slurm` / `pbs` pytest markers. Recipe: ../shared/recipes/slurm-single-node.md
# (Debian 12, root, no systemd, loopback only).
#
# Usage:  .ci/start-slurm.sh          install if needed, start (idempotent)
#         .ci/start-slurm.sh --stop   stop the daemons this script started
#
# Writes $XPCAT_SLURM_DIR/env.sh (default /tmp/xpcat-slurm/env.sh) with
# `export SLURM_CONF=...`; source it before running pytest:
#     .ci/start-slurm.sh && . /tmp/xpcat-slurm/env.sh
# The last line printed on stdout is the path of env.sh.
set -euo pipefail

S=${XPCAT_SLURM_DIR:-/tmp/xpcat-slurm}
ENV_FILE=$S/env.sh

stop_pidfile() {
    local f=$1
    if [[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null; then
        kill "$(cat "$f")" || true
    fi
    rm -f "$f"
}

if [[ ${1:-} == "--stop" ]]; then
    stop_pidfile "$S/run/slurmd.pid"
    stop_pidfile "$S/run/slurmctld.pid"
    stop_pidfile "$S/run/munged.pid"
    echo "stopped SLURM in $S" >&2
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "start-slurm.sh: must run as root (it installs and starts slurmctld/slurmd/munged)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null \
        || ! command -v qsub >/dev/null; then
    echo "installing SLURM (Debian packages slurmctld slurmd slurm-client munge slurm-wlm-torque)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge slurm-wlm-torque >&2
fi

mkdir -p "$S/state" "$S/spool" "$S/log" "$S/run"
export SLURM_CONF=$S/slurm.conf

if [[ -s $S/run/slurmctld.pid ]] && kill -0 "$(cat "$S/run/slurmctld.pid")" 2>/dev/null \
        && [[ -s $S/run/slurmd.pid ]] && kill -0 "$(cat "$S/run/slurmd.pid")" 2>/dev/null; then
    echo "SLURM already running from $S" >&2
else
    # munge: Debian creates /etc/munge/munge.key at install
    mkdir -p /run/munge && chown munge:munge /run/munge
    if ! runuser -u munge -- /usr/bin/munge -n </dev/null >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --pid-file="$S/run/munged.pid" 2>/dev/null \
            || runuser -u munge -- /usr/sbin/munged
        # munged cannot write into $S/run as user munge; record its pid ourselves once it has daemonised
        sleep 0.5
        pgrep -u munge -x munged | tail -n1 > "$S/run/munged.pid" || true
    fi

    H=$(hostname -s)
    # CPUs / RealMemory must not exceed what `slurmd -C` reports, or the node drains.
    CPUS=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n1)
    MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
    MEM=$(( MEM > 1024 ? MEM - 512 : MEM ))
    cat > "$S/slurm.conf" <<SLURMCONF
ClusterName=xpcat-test
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=60
KillWait=5
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${H} Default=YES MaxTime=INFINITE State=UP
SLURMCONF
    slurmctld -f "$S/slurm.conf" -i
    slurmd -f "$S/slurm.conf"
fi

# wait until the node is idle (or mixed/allocated from an earlier use)
for _ in $(seq 1 30); do
    state=$(sinfo -h -o '%T' 2>/dev/null | head -n1 || true)
    case $state in idle|mixed|allocated) break ;; esac
    sleep 1
done
sinfo >&2
case ${state:-} in
    idle|mixed|allocated) ;;
    *) echo "start-slurm.sh: node not ready (state '${state:-unknown}'); see $S/log" >&2; exit 1 ;;
esac

printf 'export SLURM_CONF=%q\n' "$S/slurm.conf" > "$ENV_FILE"
echo "$ENV_FILE"
