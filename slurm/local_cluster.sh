#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost (munge, MariaDB, slurmdbd, slurmctld, slurmd), for trying the batch
# launchers and submitit sweeps without a site cluster. Debian/Ubuntu, as root, no systemd needed.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: local_cluster.sh start|stop|status|--help        (as root)
  start   install missing packages (apt-get), write /etc/slurm configs, start munged, mariadbd, slurmdbd,
          slurmctld, slurmd; wait until the node is idle and `srun -n1 true` works. Running daemons are kept;
          a changed slurm.conf restarts slurmctld and slurmd. Safe to repeat.
  stop    stop, in reverse order, only the daemons this script started (PIDs recorded under the state dir).
  status  one line per daemon, then `sinfo`. Exit 0 when all five run.
env: MOR_SLURM_CPUS=N   declare N CPUs on the node (default: what `slurmd -C` reports).
     MOR_SLURM_STATE=DIR state dir: logs, recorded PIDs, Slurm spool (default /var/lib/mor-slurm).
EOF
}

STATE=${MOR_SLURM_STATE:-/var/lib/mor-slurm}
LOG=$STATE/log PIDS=$STATE/pid CONF=/etc/slurm
CLUSTER=mor PARTITION=debug DB=slurm_acct_db
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)      # start order; stop goes in reverse
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: $*" >&2; exit 1; }

# A daemon's log, named after the daemon; shown on failure so the cause is one screen away.
fail() {  # fail DAEMON MESSAGE
  echo "local_cluster: $2" >&2
  if [[ -f $LOG/$1.log ]]; then echo "--- last lines of $LOG/$1.log:" >&2; tail -n 25 "$LOG/$1.log" >&2; fi
  exit 1
}

# Bounded wait: retry CMD every half second for SECONDS.
wait_for() {  # wait_for SECONDS CMD...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do (( SECONDS < deadline )) || return 1; sleep 0.5; done
}

# PID $2 runs program $1 and is not a zombie awaiting its reaper.
alive() {
  local st
  [[ -n ${2:-} && $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]] && read -r _ _ st _ <"/proc/$2/stat" && [[ $st != Z ]]
}
gone() { ! alive "$@"; }
# PID of the daemon this script started, if it still runs (the comm check guards against a reused PID).
ours() { local p; p=$(cat "$PIDS/$1.pid" 2>/dev/null || true); alive "$1" "$p" && echo "$p"; }
# A process of that name this script did not start: left alone and reported.
foreign() {
  local p
  for p in $(pgrep -x "$1" || true); do alive "$1" "$p" && [[ $p != "$(ours "$1")" ]] && { echo "$p"; return 0; }; done
  return 1
}

# Each daemon writes its own pid file; record it here so that stop touches only what start launched.
record() {  # record DAEMON PIDFILE TIMEOUT
  wait_for "$3" test -s "$2" || fail "$1" "$1 did not start within $3 s (no pid file $2)"
  local p; p=$(cat "$2"); wait_for 5 alive "$1" "$p" || fail "$1" "$1 exited right after starting"
  echo "$p" >"$PIDS/$1.pid"
}

# Pid files of the daemons themselves (a stale one confuses later starts and package scripts).
daemon_pidfile() {
  case $1 in
    munged) echo /run/munge/munged.pid ;;
    mariadbd) echo /run/mysqld/mysqld.pid ;;
    *) echo "$STATE/run/$1.pid" ;;
  esac
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Package lists may be absent or stale on a fresh image: refresh once, then retry.
  local install=(apt-get install -y --no-install-recommends "${missing[@]}")
  "${install[@]}" >"$LOG/apt.log" 2>&1 \
    || { apt-get update >>"$LOG/apt.log" 2>&1 && "${install[@]}" >>"$LOG/apt.log" 2>&1; } \
    || fail apt "apt-get install failed"
}

prepare() {
  getent hosts "$(hostname)" >/dev/null || echo "127.0.0.1 $(hostname)" >>/etc/hosts   # slurmd resolves its own name
  install -d -m 0755 /run/munge /run/mysqld "$CONF" "$STATE/run" "$LOG"
  chown munge:munge /run/munge; chown mysql:mysql /run/mysqld
  install -d -m 0755 -o slurm -g slurm "$STATE/ctld" "$STATE/d" && chown slurm:slurm "$STATE/run"
  install -d -m 0700 "$PIDS"
  # Daemons that drop root must be able to open their own log.
  touch "$LOG"/{munged,mariadbd,slurmdbd,slurmctld,slurmd}.log
  chown munge:munge "$LOG/munged.log"; chown mysql:mysql "$LOG/mariadbd.log"
  chown slurm:slurm "$LOG"/slurm{dbd,ctld}.log
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key   # munged refuses a readable key
  [[ -s $STATE/db.pass ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr '+/' 'xy' >"$STATE/db.pass")
}

write_slurm_conf() {  # prints "changed" when slurm.conf differs from the one on disk
  local hw host cpus mem node over=""
  hw=$(slurmd -C | head -n1); host=$(hostname -s)
  mem=$(($(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw") * 9 / 10))   # full size drains the node
  if [[ -n ${MOR_SLURM_CPUS:-} ]]; then
    [[ $MOR_SLURM_CPUS =~ ^[1-9][0-9]*$ ]] || die "MOR_SLURM_CPUS must be a positive integer"
    cpus=$MOR_SLURM_CPUS node="CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1"
    over=$'# The node may declare more CPUs than the machine has: do not drain it for that.\n'
    over+=$'SlurmdParameters=config_overrides\n'
  else
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    node=$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$hw" | paste -sd' ')
  fi
  cat >"$CONF/slurm.conf.new" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may run again.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# No cgroups or systemd here: track and launch tasks portably.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Cores and memory are consumable; without DefMemPerCPU a job takes all memory and jobs run one at a time.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
${over}SchedulerParameters=batch_sched_delay=0,sched_interval=2
ReturnToService=2
KillWait=5
JobRequeue=1
MailProg=/bin/true
# sacct (and submitit's view of CANCELLED/TIMEOUT) needs the accounting daemon.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
NodeName=$host NodeAddr=127.0.0.1 $node RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF/slurm.conf.new" "$CONF/slurm.conf"; then rm "$CONF/slurm.conf.new"
  else mv "$CONF/slurm.conf.new" "$CONF/slurm.conf"; chmod 0644 "$CONF/slurm.conf"; echo changed; fi
  cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$LOG/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$(cat "$STATE/db.pass")
StorageLoc=$DB
EOF
  chown slurm:slurm "$CONF/slurmdbd.conf"; chmod 0600 "$CONF/slurmdbd.conf"   # slurmdbd insists: it holds a password
}

start_one() {  # start_one DAEMON: start it unless it runs already
  local d=$1 p pidfile; pidfile=$(daemon_pidfile "$d")
  if p=$(ours "$d"); then say "$d already running (pid $p)"; return; fi
  if p=$(foreign "$d"); then say "$d already running (pid $p), not started by this script: left alone"; return; fi
  rm -f "$pidfile" "$PIDS/$d.pid"
  case $d in
    munged) runuser -u munge -- /usr/sbin/munged --log-file="$LOG/munged.log" || fail munged "munged failed to start" ;;
    mariadbd)
      [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >>"$LOG/mariadbd.log" 2>&1
      # No networking: slurmdbd talks over the socket, and no port can clash with another database.
      setsid mariadbd --user=mysql --skip-networking --pid-file="$pidfile" --log-error="$LOG/mariadbd.log" \
        </dev/null >>"$LOG/mariadbd.log" 2>&1 &
      ;;
    slurmdbd) slurmdbd || fail slurmdbd "slurmdbd failed to start" ;;
    slurmctld) slurmctld || fail slurmctld "slurmctld failed to start" ;;
    slurmd) slurmd || fail slurmd "slurmd failed to start" ;;
  esac
  record "$d" "$pidfile" 30
  # Ready, not just alive, before the next daemon needs it; a daemon that dies meanwhile fails at once.
  local ready=true deadline=$((SECONDS + 30))
  case $d in
    munged) ready='munge -n | unmunge' ;;
    mariadbd) ready='mariadb-admin ping' ;;
    slurmdbd) ready='sacctmgr -n list cluster' ;;
    slurmctld) ready='scontrol ping' ;;
  esac
  until bash -c "$ready" >/dev/null 2>&1; do
    ours "$d" >/dev/null || fail "$d" "$d exited while starting"
    ((SECONDS < deadline)) || fail "$d" "$d did not answer within 30 s ($ready)"
    sleep 0.5
  done
  if [[ $d == mariadbd ]]; then
    mariadb <<EOF || fail mariadbd "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS $DB;
CREATE USER IF NOT EXISTS 'slurm'@'localhost';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(cat "$STATE/db.pass")';
GRANT ALL ON $DB.* TO 'slurm'@'localhost';
EOF
  fi
  say "$d started (pid $(ours "$d"))"
}

stop_one() {  # stop_one DAEMON: only if this script started it
  local d=$1 p
  if p=$(ours "$d"); then
    kill "$p"
    wait_for 30 gone "$d" "$p" || { say "$d (pid $p) ignored SIGTERM for 30 s: killing it"; kill -9 "$p"; sleep 1; }
    say "$d stopped (pid $p)"
  elif p=$(foreign "$d"); then say "$d (pid $p) was not started by this script: left running"; return
  else say "$d not running"; fi
  rm -f "$PIDS/$d.pid" "$(daemon_pidfile "$d")"
}

cmd_start() {
  install -d -m 0755 "$STATE" "$LOG"
  install_packages
  prepare
  local changed d; changed=$(write_slurm_conf)
  if [[ $changed == changed ]] && { ours slurmctld || ours slurmd; } >/dev/null; then
    say "slurm.conf changed: restarting slurmctld and slurmd (a new node line needs a restart)"
    stop_one slurmd; stop_one slurmctld
  fi
  for d in "${DAEMONS[@]}"; do start_one "$d"; done
  # slurmctld registers the cluster itself; add it if an older database lacks it.
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  local host; host=$(hostname -s)
  # A node left DOWN/DRAINED by an earlier run would never take jobs: put it back.
  sinfo -h -n "$host" -o %T | grep -Eq 'down|drain' && scontrol update nodename="$host" state=resume 2>/dev/null || true
  wait_for 60 bash -c "sinfo -h -n $host -o %T | grep -Eq '^(idle|mixed|allocated)'" \
    || fail slurmd "node $host not ready within 60 s: $(sinfo -h -N -o '%T %E' 2>&1)"
  timeout 60 srun -n1 -t 1 true >/dev/null 2>"$LOG/srun.log" || fail srun "srun -n1 true failed"
  say "cluster '$CLUSTER' ready: partition $PARTITION, $(sinfo -h -o '%c CPUs, %m MB' | head -n1); logs in $LOG"
}

cmd_stop() { local i; for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_one "${DAEMONS[i]}"; done; }

cmd_status() {
  local d p all=0
  for d in "${DAEMONS[@]}"; do
    if p=$(ours "$d"); then echo "$d: running (pid $p)"
    elif p=$(foreign "$d"); then echo "$d: running (pid $p, not started by this script)"
    else echo "$d: not running"; all=1; fi
  done
  sinfo 2>&1 || true
  return $all
}

case ${1:-} in
  -h | --help | help) usage; exit 0 ;;
  start | stop | status) ;;
  *) usage >&2; exit 2 ;;
esac
[[ $EUID -eq 0 ]] || { echo "needs root: $0 manages system daemons (munge, MariaDB, Slurm); use sudo" >&2; exit 2; }
"cmd_$1"
