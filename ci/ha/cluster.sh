#!/usr/bin/env bash
# A real two-node Corosync 3 + Pacemaker 2.1 cluster on one machine, for
# failover tests: each node lives in its own network, mount and UTS
# namespace (the daemons' fixed paths under /run, /dev/shm, /etc/corosync
# and /var/lib/pacemaker are private to it), the nodes talk over two veth
# pairs (corosync's knet links 0 and 1) with 198.18.x.y test addresses that
# exist only there, and a fence agent really kills the fenced node: every
# process in its mount and network namespaces, like pulling its power.
#
# Usage (as root):  ci/ha/cluster.sh COMMAND [ARGS]
#   up            create the namespaces, seed the CIB, start both nodes and
#                 wait until both are online and the cluster settled
#   down          stop every process of both nodes, delete the namespaces,
#                 the fence agent and the state directory
#   on N CMD...   run CMD inside node N (CLIs such as crm_mon, crm_resource)
#   crash N       SIGKILL every process of node N
#   start N       start node N again after a crash (refused while it runs)
#   stop N        stop node N gracefully (pacemakerd, then corosync)
#   pids N        the processes of node N, one per line
#   settle N      wait (from node N) until the cluster has no pending actions
#   self-test     up with a Dummy on n1; crash n1: the Dummy moves to n2;
#                 restart n1; cut both links of n1: n2 fences it (its
#                 processes are killed); restart n1; down
# Environment:
#   RW_HA_STATE        state directory (default /var/tmp/rewind-ha)
#   RW_HA_NAME         prefix of namespace and interface names, at most 8
#                      characters (default rwha)
#   RW_HA_TOKEN        corosync totem token in ms (default 1000)
#   RW_HA_RESOURCES    file with XML put inside <resources> (default: a
#                      Dummy named "dummy")
#   RW_HA_CONSTRAINTS  file with XML put inside <constraints> (default:
#                      dummy prefers n1)
# Every wait polls with a deadline of 60 to 120 s: the box has 2 cores and
# is slow at times.
set -euo pipefail

STATE=${RW_HA_STATE:-/var/tmp/rewind-ha}
NAME=${RW_HA_NAME:-rwha}
TOKEN=${RW_HA_TOKEN:-1000}
NODES="1 2"
# Pacemaker finds fence agents in /usr/sbin only; one copy per run, so
# clusters of other runs keep theirs.
FENCE_AGENT=/usr/sbin/fence_rewind_netns_$NAME
HERE=$(cd "$(dirname "$0")" && pwd)

log()   { echo "[$(date +%T.%N | cut -c1-12)] cluster.sh: $*" >&2; }
die()   { log "FAIL: $*"; exit 1; }
now()   { echo $(( $(date +%s%N) / 1000000 )); }
since() { local d=$(( $(now) - $1 )); printf '%d.%03d' $((d / 1000)) $((d % 1000)); }

[ ${#NAME} -le 8 ] || die "RW_HA_NAME must have at most 8 characters (interface names)"
ns()   { echo "$NAME-n$1"; }
link() { echo "$NAME$1l$2"; }            # link NODE LINK
addr() { echo "198.18.$2.$1"; }          # addr NODE LINK

need() {
  local missing="" c
  for c in "$@"; do command -v "$c" >/dev/null || missing+=" $c"; done
  [ -z "$missing" ] || die "missing:$missing (install pacemaker corosync pacemaker-cli-utils resource-agents: ci/install-deps.sh)"
}

holder_pid() { cat "$STATE/n$1/holder.pid"; }
# Runs a command inside node N: the holder's net, mount and UTS namespaces.
# (`ip netns exec` would not do: it makes a new mount namespace each time
# and so misses the node's private /run and /dev/shm.)
on() { local n=$1; shift; nsenter -t "$(holder_pid "$n")" -m -n -u -- "$@"; }
# Starts a daemon inside node N; nsenter without -p execs, so $! is the
# daemon's own PID.
on_bg() {  # on_bg N NAME CMD...
  local n=$1 name=$2; shift 2
  (exec nsenter -t "$(holder_pid "$n")" -m -n -u -- "$@" </dev/null >"$STATE/n$n/$name.out" 2>&1) &
  echo $! >"$STATE/n$n/$name.pid"
  disown $!
}

# ------------------------------------------------------------------ network
net_up() {
  local n l
  for n in $NODES; do ip netns add "$(ns "$n")"; ip -n "$(ns "$n")" link set lo up; done
  for l in 0 1; do
    ip link add "$(link 1 "$l")" netns "$(ns 1)" type veth peer name "$(link 2 "$l")" netns "$(ns 2)"
    for n in $NODES; do
      ip -n "$(ns "$n")" addr add "$(addr "$n" "$l")/24" dev "$(link "$n" "$l")"
      ip -n "$(ns "$n")" link set "$(link "$n" "$l")" up
    done
  done
}
net_down() { local n; for n in $NODES; do ip netns del "$(ns "$n")" 2>/dev/null || true; done; }

# ------------------------------------------------------------------ configuration
write_corosync_conf() {
  cat >"$1" <<CONF
totem {
    version: 2
    cluster_name: rewind-test
    transport: knet
    crypto_cipher: aes256
    crypto_hash: sha256
    token: $TOKEN
    interface {
        linknumber: 0
    }
    interface {
        linknumber: 1
    }
}
nodelist {
    node {
        ring0_addr: $(addr 1 0)
        ring1_addr: $(addr 1 1)
        name: n1
        nodeid: 1
    }
    node {
        ring0_addr: $(addr 2 0)
        ring1_addr: $(addr 2 1)
        name: n2
        nodeid: 2
    }
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_stderr: no
    to_syslog: no
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    timestamp: on
}
CONF
}

# The initial CIB, written before pacemaker starts. dc-deadtime=2s: the
# default 20 s would delay the first election that long.
write_cib() {
  local f=$1 resources constraints
  if [ -n "${RW_HA_RESOURCES:-}" ]; then resources=$(cat "$RW_HA_RESOURCES"); else resources='
  <primitive id="dummy" class="ocf" provider="pacemaker" type="Dummy">
    <operations><op id="dummy-mon" name="monitor" interval="2s" timeout="20s"/></operations>
  </primitive>'; fi
  if [ -n "${RW_HA_CONSTRAINTS:-}" ]; then constraints=$(cat "$RW_HA_CONSTRAINTS"); else constraints='
  <rsc_location id="dummy-prefers-n1" rsc="dummy" node="n1" score="100"/>'; fi
  cibadmin --empty >"$f"
  (
    export CIB_file=$f
    crm_attribute --type crm_config --name dc-deadtime --update 2s
    crm_attribute --type crm_config --name stonith-enabled --update true
    crm_attribute --type crm_config --name stonith-action --update off
    crm_attribute --type crm_config --name no-quorum-policy --update stop
    crm_attribute --type crm_config --name cluster-recheck-interval --update 1min
    # crm_attribute --type rsc_defaults cannot map names in a CIB file
    cibadmin --create -o configuration -X '<rsc_defaults><meta_attributes id="rsc-options"><nvpair id="rsc-options-stickiness" name="resource-stickiness" value="200"/></meta_attributes></rsc_defaults>'
    local fence="" n
    for n in $NODES; do
      # In a split, whoever fences n2 waits 5 s first, so n2 wins the race.
      fence+="
  <primitive id=\"fence-n$n\" class=\"stonith\" type=\"${FENCE_AGENT##*/}\">
    <instance_attributes id=\"fence-n$n-ia\">
      <nvpair id=\"fence-n$n-hl\" name=\"pcmk_host_list\" value=\"n$n\"/>
      <nvpair id=\"fence-n$n-sd\" name=\"state_dir\" value=\"$STATE\"/>$(
        [ "$n" = 2 ] && echo "
      <nvpair id=\"fence-n2-delay\" name=\"pcmk_delay_base\" value=\"5s\"/>")
    </instance_attributes>
    <operations><op id=\"fence-n$n-mon\" name=\"monitor\" interval=\"60s\"/></operations>
  </primitive>"
    done
    cibadmin --replace --scope resources --xml-text "<resources>$fence$resources
</resources>"
    cibadmin --replace --scope constraints --xml-text "<constraints>
  <rsc_location id=\"fence-n1-not-n1\" rsc=\"fence-n1\" node=\"n1\" score=\"-INFINITY\"/>
  <rsc_location id=\"fence-n2-not-n2\" rsc=\"fence-n2\" node=\"n2\" score=\"-INFINITY\"/>$constraints
</constraints>"
    crm_verify -x "$f"
  ) || die "the seed CIB does not verify"
}

node_prepare() {
  local n=$1 d=$STATE/n$1
  mkdir -p "$d"/{etc-corosync,var-lib-corosync,log-corosync,log-pacemaker} \
           "$d"/var-lib-pacemaker/{cib,pengine,blackbox,cores}
  write_corosync_conf "$d/etc-corosync/corosync.conf"
  install -m 0400 "$STATE/authkey" "$d/etc-corosync/authkey"
  install -m 0600 -o hacluster -g haclient "$STATE/cib-seed.xml" "$d/var-lib-pacemaker/cib/cib.xml"
  chown -R hacluster:haclient "$d/var-lib-pacemaker" "$d/log-pacemaker"
}

# The holder: a process whose namespaces are node N's. It mounts tmpfs on
# /run (first, so libmount's utab stays private) and /dev/shm, and binds
# the node's own directories over the daemons' fixed paths.
# A fence of the node that pacemaker still runs (a retry after a split)
# may kill a holder that has just started: try again a few times.
holder_start() {
  local n=$1 try
  for try in 1 2 3 4 5; do
    holder_start_once "$n" && return 0
    log "the holder of n$n died as it started (try $try; a fence still running?): $(cat "$STATE/n$n/holder.log" 2>/dev/null)"
    sleep 1
  done
  die "the holder of n$n did not stay up"
}
holder_start_once() {
  local n=$1 d=$STATE/n$1 i
  rm -f "$d/holder.pid"
  nsenter --net="/run/netns/$(ns "$n")" -- unshare --mount --uts --propagation private -- \
    sh -c '
      set -e
      d=$1; hostname "n$2"
      mount -t tmpfs -o mode=755  tmpfs /run
      mount -t tmpfs -o mode=1777 tmpfs /dev/shm
      mount --bind "$d/etc-corosync"      /etc/corosync
      mount --bind "$d/var-lib-corosync"  /var/lib/corosync
      mount --bind "$d/var-lib-pacemaker" /var/lib/pacemaker
      mount --bind "$d/log-corosync"      /var/log/corosync
      mount --bind "$d/log-pacemaker"     /var/log/pacemaker
      mkdir -p /run/crm /run/lock /run/resource-agents
      chown hacluster:haclient /run/crm
      echo $$ > "$d/holder.pid"
      exec sleep infinity
    ' holder "$d" "$n" </dev/null >"$d/holder.log" 2>&1 &
  disown $!
  for i in $(seq 100); do [ -s "$d/holder.pid" ] && break; sleep 0.1; done
  [ -s "$d/holder.pid" ] || { cat "$d/holder.log" >&2; die "the holder of n$n did not start"; }
  readlink "/proc/$(holder_pid "$n")/ns/mnt" >"$d/mntns" || return 1
  readlink "/proc/$(holder_pid "$n")/ns/net" >"$d/netns" || return 1
  sleep 0.3
  kill -0 "$(holder_pid "$n")" 2>/dev/null
}

# Every PID in node N's mount AND network namespace. The network namespace
# is pinned by its name under /run/netns, so its inode cannot be reused by
# a stranger while it exists; a freed mount namespace's inode could be.
node_pids() {
  local pat net p
  [ -r "$STATE/n$1/mntns" ] && [ -r "$STATE/n$1/netns" ] || return 0
  net=$(cat "$STATE/n$1/netns")
  pat=$(sed 's/[][*?\\]/\\&/g' "$STATE/n$1/mntns")
  for p in $(find /proc -mindepth 3 -maxdepth 3 -path '/proc/[0-9]*/ns/mnt' -lname "$pat" 2>/dev/null | cut -d/ -f3); do
    [ "$(readlink "/proc/$p/ns/net" 2>/dev/null)" = "$net" ] && echo "$p"
  done
  return 0
}
node_crash() {
  local pids i
  for i in 1 2 3 4 5; do
    pids=$(node_pids "$1")
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  [ -z "$(node_pids "$1")" ] || die "n$1 still has processes: $(node_pids "$1" | xargs)"
}

wait_until() {  # wait_until SECONDS WHAT CMD...: polls CMD every 0.1 s
  local to=$1 what=$2 t0; shift 2; t0=$(now)
  until "$@" >/dev/null 2>&1; do
    [ $(( $(now) - t0 )) -lt $(( to * 1000 )) ] || die "timed out after ${to}s waiting for $what"
    sleep 0.1
  done
  log "$what after $(since "$t0") s"
}
corosync_ready() { on "$1" corosync-cfgtool -s; }
two_votes()      { on "$1" corosync-quorumtool -s | grep "Total votes: *2" >/dev/null; }
both_online()    { on "$1" crm_mon -1 | grep "Online: \[ n1 n2 \]" >/dev/null; }
settled()        { on "$1" crm_resource --wait --timeout 60s; }

node_start() {
  local n=$1
  # A second copy of a node would orphan the first one's processes.
  [ -z "$(node_pids "$n")" ] || die "n$n is still running (pids $(node_pids "$n" | xargs))"
  holder_start "$n"
  on_bg "$n" corosync corosync -f
  wait_until 60 "corosync on n$n" corosync_ready "$n"
  on_bg "$n" pacemakerd env PCMK_logfacility=none PCMK_logfile=/var/log/pacemaker/pacemaker.log pacemakerd
}

# Gracefully: pacemakerd (which moves resources away), then corosync, then
# whatever is left in the node. Each PID is checked to be the node's.
node_stop() {
  local n=$1 p pid i
  for p in pacemakerd corosync; do
    [ -s "$STATE/n$n/$p.pid" ] || continue
    pid=$(cat "$STATE/n$n/$p.pid")
    if kill -0 "$pid" 2>/dev/null && [ "$(readlink "/proc/$pid/ns/mnt")" = "$(cat "$STATE/n$n/mntns")" ]; then
      kill -TERM "$pid"
      for i in $(seq 1200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  node_crash "$n"
}

# ------------------------------------------------------------------ commands
cmd_up() {
  need corosync pacemakerd crm_mon crm_resource cibadmin crm_attribute corosync-keygen nsenter unshare ip
  if [ -e "$STATE/cib-seed.xml" ] || ip netns list | grep -E "^$NAME-n[12]( |$)" >/dev/null; then
    log "leftovers of an earlier run: cleaning up first"
    cmd_down
  fi
  install -m 0755 "$HERE/fence_rewind_netns" "$FENCE_AGENT"
  mkdir -p "$STATE"; chmod 755 "$STATE"
  corosync-keygen -k "$STATE/authkey" >/dev/null
  write_cib "$STATE/cib-seed.xml"
  net_up
  local n t0; t0=$(now)
  for n in $NODES; do node_prepare "$n"; done
  for n in $NODES; do node_start "$n"; done
  wait_until 60 "corosync membership of 2" two_votes 1
  wait_until 90 "both nodes online" both_online 1
  wait_until 120 "the cluster settled" settled 1
  log "up in $(since "$t0") s"
}

cmd_down() {
  local n
  for n in $NODES; do [ -s "$STATE/n$n/mntns" ] && node_stop "$n"; done
  net_down
  rm -f "$FENCE_AGENT"
  rm -rf "$STATE"/n1 "$STATE"/n2 "$STATE"/cib-seed.xml "$STATE"/authkey "$STATE"/fence.log
  rmdir "$STATE" 2>/dev/null || true
}

dummy_on_n2() { on 2 crm_resource --locate -r dummy | grep "running on: n2" >/dev/null; }
links() { local l; for l in 0 1; do ip -n "$(ns "$1")" link set "$(link "$1" "$l")" "$2"; done; }
cmd_self_test() {
  cmd_up
  trap cmd_down EXIT
  on 1 crm_resource --locate -r dummy | grep "running on: n1" >/dev/null || die "dummy is not on n1"
  log "crash: SIGKILL of every process of n1"
  local t0; t0=$(now)
  node_crash 1
  wait_until 90 "dummy running on n2" dummy_on_n2
  log "failover of dummy: $(since "$t0") s after the crash"
  grep "n1 is off" "$STATE/fence.log" >/dev/null || die "the fence agent did not report n1 off"
  node_start 1
  wait_until 90 "n1 rejoined" both_online 2
  wait_until 120 "the cluster settled" settled 2
  log "split: both links of n1 down while it runs; n2 must fence it (n1 waits 5 s to fence n2)"
  : >"$STATE/fence.log"
  links 1 down
  wait_until 90 "n1 fenced by n2 (no process left)" sh -c "[ -z \"\$('$0' pids 1)\" ]"
  grep "killing n1 pids" "$STATE/fence.log" >/dev/null || die "the fence agent did not kill n1"
  # The fence action ends once it finds n1 without processes.
  wait_until 60 "the fence of n1 to finish" grep -q "n1 is off" "$STATE/fence.log"
  links 1 up
  node_start 1
  wait_until 90 "n1 rejoined" both_online 2
  wait_until 120 "the cluster settled" settled 2
  log "self-test passed"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  on) shift; n=$1; shift; on "$n" "$@" ;;
  crash) node_crash "$2" ;;
  start) node_start "$2" ;;
  stop) node_stop "$2" ;;
  pids) node_pids "$2" ;;
  settle) wait_until 120 "the cluster settled" settled "$2" ;;
  self-test) cmd_self_test ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
