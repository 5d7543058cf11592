#!/usr/bin/env bash
# A single-node Slurm on this machine, to try `sweep.py --cluster=slurm` on and for CI's test of it
# (tests/test_slurm.py). Debian's packages, started by hand: no systemd, no accounting.
#
#   tools/slurm_local.sh install   # apt-get the four packages (as root), if they are missing
#   tools/slurm_local.sh start     # munged, slurmctld, slurmd; waits until the node is idle
#   tools/slurm_local.sh stop      # cancels its jobs, stops the daemons that start started
#   tools/slurm_local.sh status
#
# Everything (munge key and socket, slurm.conf, state, logs, pid files) lives in $SLURM_LOCAL_DIR
# (default /tmp/slurm_local), so the system's own /etc/munge and /etc/slurm are left alone; the
# clients (sinfo, sbatch, sweep.py) find the cluster through SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf,
# which start prints. Ports: $SLURM_LOCAL_PORT (default 6817) and the next. Run as root; as
# another user munged and slurmctld start, but slurmd cannot launch jobs as that user everywhere.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm_local}
CONF=$DIR/slurm.conf
# slurmd listens on the next port; another Slurm on this machine needs other ports
PORT=${SLURM_LOCAL_PORT:-6817}
export SLURM_CONF=$CONF
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "slurm_local.sh: $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "Slurm is not installed, and installing it needs root and apt-get (${PACKAGES[*]})"
        return 1
    fi
    # A fresh machine's package lists may be missing or stale.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
        >/dev/null
}

write_conf() {
    local user node
    user=$(id -un)
    node=$(hostname -s)
    cat > "$CONF" <<EOF
# Written by tools/slurm_local.sh: one node, this machine.
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only once its old credential has expired (default
# 120 s); 10 s keeps a requeue quick.
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups (containers often lack them), no accounting database.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# The default intervals (60 s, 30 s) would leave a submitted job pending for up to a minute.
SchedulerParameters=sched_interval=5,bf_interval=5
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# A partition with a time limit, for sweep.py's check of --time.
PartitionName=short Nodes=ALL MaxTime=10 State=UP
EOF
}

alive() {  # alive NAME: the daemon NAME whose pid file is in DIR runs (not a reused pid)
    local pid stat
    pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
    # a daemon whose parent is gone stays a zombie where PID 1 does not reap: it has ended
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$(echo "${stat##*) }" | cut -d' ' -f1)" != Z ]
}

start() {
    for daemon in munged slurmctld slurmd; do
        if alive "$daemon"; then
            say "$daemon from $DIR already runs (pid $(cat "$DIR/$daemon.pid")); stop it first"
            return 1
        fi
    done
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { say "no $tool: run $0 install"; return 1; }
    done
    # munged wants the socket's directory searchable by all, and writable by no one else.
    mkdir -p "$DIR/ctld" "$DIR/slurmd"
    chmod 755 "$DIR"
    if [ ! -s "$DIR/munge.key" ]; then
        (umask 077 && head -c 1024 /dev/urandom > "$DIR/munge.key")
    fi
    write_conf
    munged --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" \
        || { say "munged did not start: $(tail -n 3 "$DIR/munged.log" 2>/dev/null)"; return 1; }
    slurmctld -f "$CONF" \
        || { say "slurmctld did not start: $(tail -n 3 "$DIR/slurmctld.log")"; return 1; }
    slurmd -f "$CONF" \
        || { say "slurmd did not start: $(tail -n 3 "$DIR/slurmd.log")"; return 1; }
    local state=""
    for _ in $(seq 1 60); do
        state=$(sinfo --noheader --format=%t 2>/dev/null | head -n 1) || true
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        say "the node is not idle after 30 s (sinfo: '${state}'); see $DIR/slurm*.log"
        return 1
    fi
    say "Slurm runs, partitions:" \
        "$(sinfo --noheader --format='%R (%c CPUs, time limit %l)' | paste -sd' '); for clients:"
    echo "export SLURM_CONF=$CONF"
}

stop() {
    # Its jobs first, so that no job step outlives slurmd.
    if alive slurmctld; then
        scancel --user="$(id -un)" 2>/dev/null || true
    fi
    local stopped=()
    for daemon in slurmd slurmctld munged; do
        alive "$daemon" || continue
        local pid
        pid=$(cat "$DIR/$daemon.pid")
        kill "$pid"
        for _ in $(seq 1 40); do
            alive "$daemon" || break
            sleep 0.25
        done
        if alive "$daemon"; then
            kill -KILL "$pid"
        fi
        stopped+=("$daemon ($pid)")
    done
    say "stopped: ${stopped[*]:-nothing was running from $DIR}"
}

status() {
    for daemon in munged slurmctld slurmd; do
        if alive "$daemon"; then
            echo "$daemon: pid $(cat "$DIR/$daemon.pid")"
        else
            echo "$daemon: not running"
        fi
    done
    if alive slurmctld; then sinfo; squeue; fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status (state in \$SLURM_LOCAL_DIR, default" \
            "/tmp/slurm_local)" >&2
       exit 2 ;;
esac
