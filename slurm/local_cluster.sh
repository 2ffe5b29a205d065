#!/usr/bin/env bash
# A real Slurm cluster of 1-4 nodes on this one machine (munge, MariaDB, slurmdbd, slurmctld, one slurmd per node),
# for trying the batch launchers, multi-node jobs and submitit sweeps without a site cluster. Debian/Ubuntu, as
# root, no systemd needed.
#
# How N nodes share one host: Slurm's multiple-slurmd mode. Each node is its own `slurmd -N nodeK` with its own
# port, spool, pid file and log, declared in slurm.conf with NodeHostname=<this host> and its own address
# NodeAddr=127.0.2.K (all of 127/8 is loopback), which /etc/hosts gives the name nodeK. So a job's node list,
# `scontrol show hostnames`, `srun` across nodes and a rendezvous on the first node's name behave as on a real
# cluster, and killing one node's processes (or `scontrol update nodename=node2 state=down`) is a node failure.
# Why not one network namespace per node: Debian's Slurm is built with multiple-slurmd support, which needs no
# bridge, veth pairs or routes to set up and tear down, and nodes in a namespace would still share this host's
# file system, processes and host name; what the tests need from separate nodes (names, addresses, separate
# slurmd and task sets, per-node CPU and memory) this mode gives. Its one difference from a real cluster: every
# node's tasks see the same `hostname`; Slurm's SLURMD_NODENAME tells them apart.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: local_cluster.sh start [--nodes N] | stop | status | --help        (as root)
  start   install missing packages (apt-get), write /etc/slurm configs and the nodes' names in /etc/hosts,
          start munged, mariadbd, slurmdbd, slurmctld and one slurmd per node: node1..nodeN at 127.0.2.1..N,
          N = 1 by default, at most 4. Wait until every node is idle and `srun` runs a task on each. Running
          daemons are kept; a changed slurm.conf (another N, other CPUs) stops every slurmd and slurmctld and
          starts them anew. Safe to repeat.
  stop    stop, in reverse order, only the daemons this script started (PIDs recorded under the state dir).
  status  one line per daemon (one per node for slurmd), then `sinfo`. Exit 0 when all run.
The nodes share this host through Slurm's multiple-slurmd mode (why: the comment at the top of this script).
Each node declares its share of the machine: the CPUs divided among the nodes but at least 2 (so a 2-task job
fits on every node; with more nodes than cores the nodes together declare more CPUs than there are), and 90 % of
the memory divided among the nodes.
env: MOR_SLURM_CPUS=N   declare N CPUs on each node instead.
     MOR_SLURM_STATE=DIR state dir: logs, recorded PIDs, Slurm spool (default /var/lib/mor-slurm).
EOF
}

STATE=${MOR_SLURM_STATE:-/var/lib/mor-slurm}
LOG=$STATE/log PIDS=$STATE/pid CONF=/etc/slurm
CLUSTER=mor PARTITION=debug DB=slurm_acct_db
BASE_DAEMONS=(munged mariadbd slurmdbd slurmctld)   # start order, then one slurmd-nodeK per node; stop: reverse
MAX_NODES=4 HOSTS_TAG="# mor local_cluster.sh"
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

# A daemon's key is its program's name, with -nodeK for a node's slurmd (slurmd-node2).
prog() { echo "${1%%-*}"; }
node_of() { [[ $1 == *-* ]] && echo "${1#*-}"; }

# PID $2 runs the program of daemon $1 and is not a zombie awaiting its reaper.
alive() {
  local st
  [[ -n ${2:-} && $(cat "/proc/$2/comm" 2>/dev/null) == "$(prog "$1")" ]] && read -r _ _ st _ <"/proc/$2/stat" \
    && [[ $st != Z ]]
}
gone() { ! alive "$@"; }
# PID of the daemon this script started, if it still runs (the comm check guards against a reused PID).
ours() { local p; p=$(cat "$PIDS/$1.pid" 2>/dev/null || true); alive "$1" "$p" && echo "$p"; }
# A process of that program this script did not start (under any key): left alone and reported.
foreign() {
  local p mine; mine=" $(cat "$PIDS"/*.pid 2>/dev/null | tr '\n' ' ') "
  for p in $(pgrep -x "$(prog "$1")" || true); do
    alive "$1" "$p" && [[ $mine != *" $p "* ]] && { echo "$p"; return 0; }
  done
  return 1
}
# The slurmd keys recorded under the state dir (an earlier start's nodes, whatever N it had).
# (slurmd.pid: the one node of this script's versions before --nodes.)
recorded_slurmds() {
  local f; for f in "$PIDS"/slurmd.pid "$PIDS"/slurmd-*.pid; do [[ -e $f ]] && basename "$f" .pid; done; return 0
}
nodes_wanted() { cat "$STATE/nodes" 2>/dev/null || echo 1; }
slurmd_keys() { local k; for ((k = 1; k <= $1; k++)); do echo "slurmd-node$k"; done; }

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
    *) echo "$STATE/run/$1.pid" ;;     # slurm.conf: SlurmdPidFile=$STATE/run/slurmd-%n.pid
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

# nodeK -> 127.0.2.K in /etc/hosts, for every node this script may run (so a later --nodes finds them), marked
# so that they are replaced, not repeated. Written in place: /etc/hosts is often a mount that cannot be renamed over.
write_hosts() {
  local k keep; keep=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
  getent hosts "$(hostname)" >/dev/null || keep+=$'\n'"127.0.0.1 $(hostname)"   # slurmctld resolves its own name
  { echo "$keep"; for ((k = 1; k <= MAX_NODES; k++)); do echo "127.0.2.$k node$k $HOSTS_TAG"; done; } >/etc/hosts.mor
  cat /etc/hosts.mor >/etc/hosts; rm -f /etc/hosts.mor
}

prepare() {
  write_hosts
  install -d -m 0755 /run/munge /run/mysqld "$CONF" "$STATE/run" "$LOG"
  chown munge:munge /run/munge; chown mysql:mysql /run/mysqld
  install -d -m 0755 -o slurm -g slurm "$STATE/ctld" "$STATE/d" && chown slurm:slurm "$STATE/run"
  local k; for ((k = 1; k <= MAX_NODES; k++)); do install -d -m 0755 "$STATE/d/node$k"; done
  install -d -m 0700 "$PIDS"
  # Daemons that drop root must be able to open their own log.
  touch "$LOG"/{munged,mariadbd,slurmdbd,slurmctld}.log
  chown munge:munge "$LOG/munged.log"; chown mysql:mysql "$LOG/mariadbd.log"
  chown slurm:slurm "$LOG"/slurm{dbd,ctld}.log
  [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key   # munged refuses a readable key
  [[ -s $STATE/db.pass ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr '+/' 'xy' >"$STATE/db.pass")
}

write_slurm_conf() {  # write_slurm_conf N: prints "changed" when slurm.conf differs from the one on disk
  local n=$1 hw host cpus mem k nodes=""
  hw=$(slurmd -C | head -n1); host=$(hostname -s)
  # Each node's share of 90 % of the memory (a node declaring all of it is drained), and of the CPUs (at least 2).
  mem=$(($(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw") * 9 / 10 / n))
  if [[ -n ${MOR_SLURM_CPUS:-} ]]; then
    [[ $MOR_SLURM_CPUS =~ ^[1-9][0-9]*$ ]] || die "MOR_SLURM_CPUS must be a positive integer"
    cpus=$MOR_SLURM_CPUS
  else
    cpus=$(( $(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw") / n ))
    (( cpus >= 2 )) || cpus=2
  fi
  for ((k = 1; k <= n; k++)); do
    nodes+="NodeName=node$k NodeHostname=$host NodeAddr=127.0.2.$k Port=$((17000 + k)) CPUs=$cpus Boards=1 "
    nodes+="SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"$'\n'
  done
  cat >"$CONF/slurm.conf.new" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may run again.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
# One slurmd per node on this host (multiple-slurmd mode): %n is the node's name.
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
# No cgroups or systemd here: track and launch tasks portably.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Cores and memory are consumable; without DefMemPerCPU a job takes all memory and jobs run one at a time.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
# A node may declare more CPUs (its share, at least 2) or another layout than the hardware: do not drain it.
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_interval=2
ReturnToService=2
# Slurm's default: what is left of a cancelled job is killed 30 s after its SIGTERM. With 5 s, ranks finishing
# a step and saving it on a busy 2-core machine (load 30) were killed mid-save.
KillWait=30
JobRequeue=1
MailProg=/bin/true
# sacct (and submitit's view of CANCELLED/TIMEOUT) needs the accounting daemon.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
${nodes}PartitionName=$PARTITION Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP
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
    slurmd-*) slurmd -N "$(node_of "$d")" || fail "$d" "$d failed to start" ;;
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

cmd_start() {  # cmd_start [--nodes N]
  local n=1
  while (($#)); do
    case $1 in
      --nodes) n=${2:-}; shift 2 || true ;;
      --nodes=*) n=${1#--nodes=}; shift ;;
      *) die "start: unknown option '$1' (usage: local_cluster.sh start [--nodes N])" ;;
    esac
  done
  [[ $n =~ ^[1-9][0-9]*$ ]] && ((n <= MAX_NODES)) || die "start --nodes: expected 1 to $MAX_NODES, got '$n'"
  install -d -m 0755 "$STATE" "$LOG"
  install_packages
  prepare
  local changed d k keys; changed=$(write_slurm_conf "$n")
  mapfile -t keys < <(slurmd_keys "$n")
  for d in "${keys[@]}"; do touch "$LOG/$d.log"; done
  if [[ $changed == changed ]]; then
    # Another node set (or node line) needs every slurmd and slurmctld restarted, not `scontrol reconfigure`.
    local running=""
    for d in slurmctld $(recorded_slurmds); do ours "$d" >/dev/null && running+=" $d"; done
    if [[ -n $running ]]; then
      say "slurm.conf changed ($n node(s)): restarting slurmctld and every slurmd"
      for d in $(recorded_slurmds); do stop_one "$d"; done
      stop_one slurmctld
    fi
  fi
  for d in $(recorded_slurmds); do   # a node of an earlier start that this one does not have
    [[ " ${keys[*]} " == *" $d "* ]] || stop_one "$d"
  done
  echo "$n" >"$STATE/nodes"
  for d in "${BASE_DAEMONS[@]}" "${keys[@]}"; do start_one "$d"; done
  # slurmctld registers the cluster itself; add it if an older database lacks it.
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  # A node left DOWN/DRAINED by an earlier run (or a test that took it down) would never take jobs: put it back.
  for ((k = 1; k <= n; k++)); do
    sinfo -h -n "node$k" -o %T | grep -Eq 'down|drain' && scontrol update nodename="node$k" state=resume 2>/dev/null || true
  done
  wait_for 60 bash -c "! sinfo -h -N -o %T | grep -Evq '^(idle|mixed|allocated)'" \
    || fail "slurmd-node1" "nodes not ready within 60 s: $(sinfo -h -N -o '%N %T %E' 2>&1 | paste -sd';')"
  timeout 60 srun -N "$n" -n "$n" -t 1 true >/dev/null 2>"$LOG/srun.log" || fail srun "srun -N$n -n$n true failed"
  say "cluster '$CLUSTER' ready: partition $PARTITION, $n node(s) (node1..node$n), each" \
      "$(sinfo -h -N -o '%c CPUs, %m MB' | head -n1); logs in $LOG"
}

cmd_stop() {
  local i d
  for d in $(recorded_slurmds); do stop_one "$d"; done
  for ((i = ${#BASE_DAEMONS[@]} - 1; i >= 0; i--)); do stop_one "${BASE_DAEMONS[i]}"; done
}

cmd_status() {
  local d p all=0 keys
  mapfile -t keys < <(slurmd_keys "$(nodes_wanted)")
  for d in "${BASE_DAEMONS[@]}" "${keys[@]}"; do
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
cmd=$1; shift
[[ $cmd == start || $# -eq 0 ]] || die "$cmd takes no options"
"cmd_$cmd" "$@"
