#!/usr/bin/env bash
# Make N "hosts" on this one machine out of Linux network namespaces, for
# multi-host integration tests. Each host has its own address, reachable from
# here (the root namespace), its own sshd on that address and its own Docker
# engine; the filesystem stays shared. A host reaches this machine at <base>.<i>.1;
# this machine does not route between hosts while its FORWARD policy is DROP
# (which Docker sets).
#
# Usage: scripts/netns-hosts.sh up <state-dir> <prefix> [count=2]
#        scripts/netns-hosts.sh down <state-dir> [<prefix>]
#
# Host i (1..count) is the network namespace <prefix>-h<i> with:
#   eth0 <base>.<i>.2/24, linked by a veth to <prefix>h<i> (<base>.<i>.1) here;
#   dockerd on unix:///run/<prefix>-h<i>/docker.sock (data /var/lib/<prefix>-h<i>),
#     with the store image (and $NETNS_EXTRA_IMAGES) loaded from the root engine;
#   sshd on <base>.<i>.2:22 for root with <state-dir>/id_ed25519, where
#     DOCKER_HOST names that host's engine.
# up writes <state-dir>/hosts.json (the hosts), known_hosts and ssh_config.
# down stops and removes everything up made (also after a failed or partial up);
# with <prefix> it cleans up even when the state dir is gone. Safe to run again.
#
# Environment: NETNS_SUBNET_BASE (10.231) the hosts' /16, unique per concurrent rig;
# NETNS_DOCKER_BASE (10.232) the /16 the engines' networks are carved from, inside
# each namespace (host i: bridge <base>.<16i>.1/24, pool <base>.<16i+8>.0/21);
# EBUILDER_IMAGE (ebuilder-standin:latest) and NETNS_EXTRA_IMAGES (space separated):
# the images to load; NETNS_START_TIMEOUT (60) seconds to wait for each daemon.
set -euo pipefail
export LC_ALL=C
SELF=$(readlink -f "$0")
SUBNET_BASE=${NETNS_SUBNET_BASE:-10.231}
DOCKER_BASE=${NETNS_DOCKER_BASE:-10.232}
START_TIMEOUT=${NETNS_START_TIMEOUT:-60}
MAX_HOSTS=14

die() { echo "netns-hosts: $*" >&2; exit 1; }
note() { echo "netns-hosts: $*" >&2; }

usage() {
    die "usage: $0 up <state-dir> <prefix> [count=2] | down <state-dir> [<prefix>]"
}

# --- small helpers -----------------------------------------------------------

ip2int() {
    local IFS=. a b c d
    read -r a b c d <<<"$1"
    echo $(((a << 24) + (b << 16) + (c << 8) + d))
}

# Exit 0 when network $1/$2 and network $3/$4 (address/length) overlap.
overlaps() {
    local len=$(($2 < $4 ? $2 : $4)) mask
    mask=$(((0xffffffff << (32 - len)) & 0xffffffff))
    [ "$len" -eq 0 ] && mask=0
    [ $(($(ip2int "$1") & mask)) -eq $(($(ip2int "$3") & mask)) ]
}

# Fail when any IPv4 route of this machine (any table) overlaps <base>.0.0/16.
check_routes() {
    local base=$1 what=$2 dest net len
    while read -r dest; do
        case $dest in default | "") continue ;; esac
        net=${dest%/*}
        len=32
        [ "$dest" != "$net" ] && len=${dest#*/}
        if overlaps "$net" "$len" "$base.0.0" 16; then
            die "route $dest on this machine overlaps $base.0.0/16 ($what);" \
                "(another rig?); set ${what} to another /16, e.g. 10.241"
        fi
    done < <(ip -4 route show table all | awk '
        $1 ~ /^(unicast|local|broadcast|multicast|anycast|blackhole|unreachable|prohibit|throw|nat)$/ {print $2; next}
        {print $1}')
}

now() { echo "${EPOCHREALTIME/./}"; }    # microseconds

# A process that exited but that nobody reaped yet (our daemons' parent is init,
# which may take seconds) counts as gone.
alive() {
    local stat
    [ -n "${1:-}" ] || return 1
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [ "${stat:0:1}" != Z ]
}

# Signal pids with TERM, wait up to $1 seconds for them to go, then KILL them.
terminate() {
    local timeout=$1 pid left deadline
    shift
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    deadline=$(($(now) + timeout * 1000000))
    while :; do
        left=()
        for pid in "$@"; do alive "$pid" && left+=("$pid"); done
        [ ${#left[@]} -eq 0 ] && return 0
        [ "$(now)" -ge "$deadline" ] && break
        sleep 0.05
    done
    note "killing ${left[*]} (still running ${timeout}s after SIGTERM)"
    kill -KILL "${left[@]}" 2>/dev/null || true
    deadline=$(($(now) + 10 * 1000000))
    for pid in "${left[@]}"; do
        while alive "$pid" && [ "$(now)" -lt "$deadline" ]; do sleep 0.05; done
    done
}

json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

check_prefix() {
    [[ $1 =~ ^[a-z][a-z0-9]{1,10}$ ]] \
        || die "prefix '$1' must be 2-11 lower-case letters and digits, starting with a letter"
}

# --- inside a namespace ----------------------------------------------------
# `ip netns exec` gives the command its own mount namespace (a slave of ours, so
# nothing mounted there shows up here) with a fresh /sys that has no cgroup
# filesystems; dockerd needs them, so mount the same hierarchies again there.
in_ns_dockerd() {
    local mounts=$1 target fstype options
    shift
    if ! mountpoint -q /sys/fs/cgroup && ! grep -q '^/sys/fs/cgroup ' "$mounts"; then
        mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup
    fi
    while read -r target fstype options; do
        mkdir -p "$target"
        mountpoint -q "$target" || mount -t "$fstype" -o "$options" "$fstype" "$target"
    done < <(awk '{print length($1), $0}' "$mounts" | sort -n | cut -d' ' -f2-)
    exec dockerd "$@"
}

# --- up ---------------------------------------------------------------------

up() {
    if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
    local state prefix count
    state=$(realpath -m "$1")
    prefix=$2
    count=${3:-2}
    check_prefix "$prefix"
    if ! [[ $count =~ ^[0-9]+$ ]] || [ "$count" -lt 1 ] || [ "$count" -gt $MAX_HOSTS ]; then
        die "count must be 1..$MAX_HOSTS, not '$count'"
    fi
    [[ $SUBNET_BASE =~ ^[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "NETNS_SUBNET_BASE must look like 10.231"
    [[ $DOCKER_BASE =~ ^[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "NETNS_DOCKER_BASE must look like 10.232"
    [ "$SUBNET_BASE" != "$DOCKER_BASE" ] || die "NETNS_SUBNET_BASE and NETNS_DOCKER_BASE must differ"
    [[ $state =~ ^[A-Za-z0-9_./+=@:-]+$ ]] || die "state dir '$state' has unusual characters"

    [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, dockerd, sshd)"
    local cmd pkg
    for cmd in ip:iproute2 dockerd:docker.io docker:docker.io ssh:openssh-client \
        ssh-keygen:openssh-client findmnt:util-linux mountpoint:util-linux setsid:util-linux \
        flock:util-linux realpath:coreutils; do
        pkg=${cmd#*:} cmd=${cmd%%:*}
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found: apt-get install $pkg"
    done
    [ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd not found: apt-get install openssh-server (scripts/setup.sh does)"
    docker version >/dev/null 2>&1 || die "the root Docker engine does not answer (docker version): run scripts/setup.sh"
    local images=("${EBUILDER_IMAGE:-ebuilder-standin:latest}") image
    # shellcheck disable=SC2206  # a space-separated list on purpose
    [ -n "${NETNS_EXTRA_IMAGES:-}" ] && images+=(${NETNS_EXTRA_IMAGES})
    for image in "${images[@]}"; do
        docker image inspect "$image" >/dev/null 2>&1 \
            || die "image $image is missing in the root engine (scripts/setup.sh builds ebuilder-standin)"
    done

    if [ -e "$state/rig.env" ]; then
        die "$state already holds a rig: run '$0 down $state' first"
    fi
    local i name
    for i in $(seq 1 "$count"); do
        name=$prefix-h$i
        if [ -e "/run/netns/$name" ] || ip link show "${prefix}h$i" >/dev/null 2>&1 \
            || [ -e "/var/lib/$name" ] || [ -e "/run/$name" ]; then
            die "leftovers of an earlier rig named $prefix exist: run '$0 down $state $prefix'"
        fi
    done
    # Rigs that start at once check and take their addresses one after the other
    # (the lock is on this script: it leaves no file behind).
    exec 9<"$SELF"
    flock 9
    check_routes "$SUBNET_BASE" NETNS_SUBNET_BASE
    check_routes "$DOCKER_BASE" NETNS_DOCKER_BASE
    local driver cgroup_driver
    driver=$(docker info -f '{{.Driver}}')
    cgroup_driver=$(docker info -f '{{.CgroupDriver}}')

    mkdir -p "$state"
    # First, so that down finds everything even if this up fails half way.
    printf 'PREFIX=%s\nCOUNT=%s\n' "$prefix" "$count" >"$state/rig.env"
    STATE=$state PREFIX=$prefix
    trap up_failed EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    ssh-keygen -q -t ed25519 -N '' -C "$prefix-rig" -f "$state/id_ed25519"
    findmnt -rn -t cgroup,cgroup2 -o TARGET,FSTYPE,OPTIONS >"$state/cgroup-mounts"
    : >"$state/known_hosts"
    mkdir -p /run/sshd "/run/$prefix-ssh"    # sshd's privilege separation dir; ssh ControlPaths
    chmod 700 "/run/$prefix-ssh"

    local started
    started=$(now)
    local dir run lib addr block pool dpids=()
    for i in $(seq 1 "$count"); do
        name=$prefix-h$i dir=$state/h$i run=/run/$name lib=/var/lib/$name
        addr=$SUBNET_BASE.$i.2
        mkdir -p "$dir/customers" "$dir/backups" "$run" "$lib"
        ip netns add "$name"
        ip link add "${prefix}h$i" type veth peer name eth0 netns "$name"
        ip addr add "$SUBNET_BASE.$i.1/24" dev "${prefix}h$i"
        ip link set "${prefix}h$i" up
        ip -n "$name" link set lo up
        ip -n "$name" addr add "$addr/24" dev eth0
        ip -n "$name" link set eth0 up
        ip -n "$name" route add default via "$SUBNET_BASE.$i.1"

        block=$DOCKER_BASE.$((16 * i))
        pool=$DOCKER_BASE.$((16 * i + 8)).0/21
        # Its own key (20.10 derives the engine ID from it) and no /etc/docker/daemon.json.
        printf '{"deprecated-key-path": "%s"}\n' "$lib/key.json" >"$dir/daemon.json"
        local args=(--config-file "$dir/daemon.json" -H "unix://$run/docker.sock"
            --data-root "$lib/docker" --exec-root "$run/exec" --pidfile "$run/dockerd.pid"
            --storage-driver "$driver" --bip "$block.1/24"
            --default-address-pool "base=$pool,size=24"
            --exec-opt "native.cgroupdriver=$cgroup_driver")
        [ "$cgroup_driver" = cgroupfs ] && args+=(--cgroup-parent "/$name")
        setsid ip netns exec "$name" "$SELF" __in-ns-dockerd "$state/cgroup-mounts" "${args[@]}" \
            </dev/null >"$dir/dockerd.log" 2>&1 9<&- &
        dpids+=($!)
        echo $! >"$dir/dockerd.launch.pid"
    done

    flock -u 9
    exec 9<&-

    # sshd while the engines start.
    local pub
    for i in $(seq 1 "$count"); do
        name=$prefix-h$i dir=$state/h$i addr=$SUBNET_BASE.$i.2
        ssh-keygen -q -t ed25519 -N '' -C "$name" -f "$dir/ssh_host_ed25519_key"
        cat >"$dir/sshd_config" <<EOF
# $name: sshd of a network-namespace host (scripts/netns-hosts.sh)
ListenAddress $addr:22
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $state/id_ed25519.pub
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
SetEnv DOCKER_HOST=unix:///run/$name/docker.sock
Subsystem sftp internal-sftp
EOF
        # -E: its log; it daemonizes (stdio to /dev/null) once it listens.
        setsid ip netns exec "$name" /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log" \
            </dev/null >"$dir/sshd.out" 2>&1 \
            || die "sshd of $name did not start: $(tail -n 3 "$dir/sshd.log" "$dir/sshd.out" | tr '\n' ' ')"
        pub=$(cut -d' ' -f1,2 "$dir/ssh_host_ed25519_key.pub")
        echo "$addr $pub" >>"$state/known_hosts"
    done
    {
        for i in $(seq 1 "$count"); do
            cat <<EOF
Host $prefix-h$i $SUBNET_BASE.$i.2
    HostName $SUBNET_BASE.$i.2
EOF
        done
        cat <<EOF
Host *
    User root
    IdentityFile $state/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $state/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
EOF
    } >"$state/ssh_config"

    # Wait for every engine (at once: they start in parallel).
    local deadline sock pending
    deadline=$(($(now) + START_TIMEOUT * 1000000))
    while :; do
        pending=0
        for i in $(seq 1 "$count"); do
            sock=unix:///run/$prefix-h$i/docker.sock
            [ -e "$state/h$i/ready" ] && continue
            if docker -H "$sock" version >/dev/null 2>&1; then
                : >"$state/h$i/ready"
                continue
            fi
            alive "${dpids[$((i - 1))]}" \
                || die "dockerd of $prefix-h$i exited: $(tail -n 5 "$state/h$i/dockerd.log" | tr '\n' ' ')"
            pending=1
        done
        [ $pending = 0 ] && break
        [ "$(now)" -lt "$deadline" ] || die "dockerd did not answer within ${START_TIMEOUT}s (logs: $state/h*/dockerd.log)"
        sleep 0.1
    done
    local engines_ready=$(($(now) - started))

    # The images, saved once and loaded into every engine at once.
    docker save -o "$state/images.tar" "${images[@]}"
    local lpids=()
    for i in $(seq 1 "$count"); do
        docker -H "unix:///run/$prefix-h$i/docker.sock" load -q -i "$state/images.tar" \
            >"$state/h$i/load.log" 2>&1 &
        lpids+=($!)
    done
    for i in $(seq 1 "$count"); do
        wait "${lpids[$((i - 1))]}" || die "loading images into $prefix-h$i failed: $(cat "$state/h$i/load.log")"
    done
    rm -f "$state/images.tar"

    # Every sshd lets our key in and shows the key known_hosts has.
    deadline=$(($(now) + START_TIMEOUT * 1000000))
    for i in $(seq 1 "$count"); do
        until ssh -F "$state/ssh_config" -o ConnectTimeout=2 "$SUBNET_BASE.$i.2" true \
            2>"$state/h$i/ssh-check.log"; do
            [ "$(now)" -lt "$deadline" ] \
                || die "ssh to $SUBNET_BASE.$i.2 fails: $(tail -n 3 "$state/h$i/ssh-check.log" | tr '\n' ' ')"
            sleep 0.1
        done
    done

    {
        echo "["
        for i in $(seq 1 "$count"); do
            name=$prefix-h$i dir=$state/h$i
            printf '  {"name": %s, "netns": %s, "address": %s, "docker_url": %s,\n' \
                "$(json_str "$name")" "$(json_str "$name")" "$(json_str "$SUBNET_BASE.$i.2")" \
                "$(json_str "unix:///run/$name/docker.sock")"
            printf '   "ssh_key": %s, "known_hosts": %s, "ssh_config": %s, "ssh_control_dir": %s,\n' \
                "$(json_str "$state/id_ed25519")" "$(json_str "$state/known_hosts")" \
                "$(json_str "$state/ssh_config")" "$(json_str "/run/$prefix-ssh")"
            printf '   "data_root": %s, "backup_root": %s}%s\n' \
                "$(json_str "$dir/customers")" "$(json_str "$dir/backups")" \
                "$([ "$i" -lt "$count" ] && echo ,)"
        done
        echo "]"
    } >"$state/hosts.json.tmp"
    mv "$state/hosts.json.tmp" "$state/hosts.json"
    trap - EXIT INT TERM
    note "up: $count hosts ($driver) in $((($(now) - started) / 1000)) ms" \
        "(engines $((engines_ready / 1000)) ms); $state/hosts.json"
}

up_failed() {
    local rc=$? f
    [ $rc = 0 ] && return
    for f in "$STATE"/h*/dockerd.log "$STATE"/h*/sshd.log; do
        [ -s "$f" ] || continue
        echo "--- last lines of $f" >&2
        tail -n 8 "$f" >&2
    done
    note "up failed: tearing down what it made"
    (down "$STATE" "$PREFIX") || true
    exit "$rc"
}

# --- down -------------------------------------------------------------------

# Pids of the processes whose command line contains any of the strings given
# (read by bash itself: no grep whose own command line would match).
pids_mentioning() {
    local f pid args line pattern
    for f in /proc/[0-9]*/cmdline; do
        pid=${f#/proc/} pid=${pid%/cmdline}
        [ "$pid" = $$ ] || [ "$pid" = "$BASHPID" ] && continue
        mapfile -d '' args 2>/dev/null <"$f" || continue
        line=${args[*]}
        for pattern in "$@"; do
            if [[ $line == *"$pattern"* ]]; then
                echo "$pid"
                break
            fi
        done
    done
}

# Processes that belong to host $1: in its network namespace, in its cgroups, or
# naming its directories on their command line.
host_pids() {
    local name=$1 state=$2 i=$3 f pid
    {
        [ -e "/run/netns/$name" ] && ip netns pids "$name" 2>/dev/null
        find /sys/fs/cgroup -maxdepth 3 -type d -name "$name" 2>/dev/null | while read -r f; do
            find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null
        done
        pids_mentioning "/run/$name/" "/var/lib/$name/" "$state/h$i/"
    } | sort -un | while read -r pid; do
        [ "$pid" = $$ ] || [ "$pid" = "$BASHPID" ] && continue
        echo "$pid"
    done
}

down_host() {
    local state=$1 prefix=$2 i=$3 name=$2-h$3 pid pids
    local sock=unix:///run/$name/docker.sock
    if [ -S "/run/$name/docker.sock" ]; then
        pids=$(timeout 20 docker -H "$sock" ps -aq 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            timeout 30 docker -H "$sock" rm -f $pids >/dev/null 2>&1 || true
        fi
    fi
    pids=()
    for f in "/run/$name/dockerd.pid" "$state/h$i/dockerd.launch.pid"; do
        pid=$(cat "$f" 2>/dev/null || true)
        [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && pids+=("$pid")
    done
    [ ${#pids[@]} -gt 0 ] && terminate 20 "${pids[@]}"
    pid=$(cat "$state/h$i/sshd.pid" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] && terminate 5 "$pid"
    # containerd, shims, docker-proxy, ssh sessions, container processes.
    mapfile -t pids < <(host_pids "$name" "$state" "$i")
    [ ${#pids[@]} -gt 0 ] && terminate 5 "${pids[@]}"
    ip link delete "${prefix}h$i" 2>/dev/null || true
    [ -e "/run/netns/$name" ] && { ip netns delete "$name" || note "cannot delete netns $name"; }
    local target
    # Mounts of its engine stay in the engine's own mount namespace; this is in case.
    findmnt -rn -o TARGET | { grep -E "^(/run/$name|/var/lib/$name)(/|$)" || true; } | sort -r \
        | while read -r target; do
            umount "$target" 2>/dev/null || umount -l "$target" || note "cannot unmount $target"
        done
    find /sys/fs/cgroup -depth -type d -path "*/$name*" 2>/dev/null | while read -r target; do
        case $target in */"$name" | */"$name"/*) rmdir "$target" 2>/dev/null || true ;; esac
    done
    rm -rf "/run/$name" "/var/lib/$name"
}

down() {
    if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
    local state prefix count=0 i
    state=$(realpath -m "$1")
    prefix=${2:-}
    if [ -f "$state/rig.env" ]; then
        local p c
        p=$(sed -n 's/^PREFIX=//p' "$state/rig.env")
        c=$(sed -n 's/^COUNT=//p' "$state/rig.env")
        [ -n "$prefix" ] && [ "$prefix" != "$p" ] && die "$state holds rig $p, not $prefix"
        prefix=$p count=$c
    fi
    if [ -z "$prefix" ]; then
        [ -e "$state" ] && [ -n "$(ls -A "$state" 2>/dev/null)" ] \
            && die "$state holds no rig.env: give the prefix (down <state-dir> <prefix>)"
        rmdir "$state" 2>/dev/null || true
        return 0
    fi
    check_prefix "$prefix"
    [ "$(id -u)" = 0 ] || die "must run as root"
    # Every host of the prefix there is any trace of, not only the recorded count.
    local hosts
    hosts=$({
        seq 1 "$count"
        ip netns list 2>/dev/null | sed -n "s/^$prefix-h\([0-9]\+\)\b.*/\1/p"
        ip -o link show 2>/dev/null | sed -n "s/^[0-9]*: ${prefix}h\([0-9]\+\)[@:].*/\1/p"
        for d in /var/lib/"$prefix"-h* /run/"$prefix"-h*; do
            if [ -e "$d" ]; then echo "${d##*-h}"; fi
        done
    } | { grep -E '^[0-9]+$' || true; } | sort -un || true)
    local pids=()
    for i in $hosts; do
        down_host "$state" "$prefix" "$i" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || true; done
    # ssh connection masters (ControlPath /run/<prefix>-ssh/...).
    mapfile -t pids < <(pids_mentioning "/run/$prefix-ssh/")
    [ ${#pids[@]} -gt 0 ] && terminate 5 "${pids[@]}"
    rm -rf "/run/$prefix-ssh"
    local left
    left=$( { ip netns list; ip -o link show; findmnt -rn -o TARGET
        ls -d /var/lib/"$prefix"-h* /run/"$prefix"-h* /run/"$prefix"-ssh; } 2>/dev/null \
        | grep -E "(^|[ /])$prefix-?(h[0-9]|ssh)" || true)
    # The state dir stays while anything does, so that down can be run again.
    [ -z "$left" ] || die "down left these behind: $(echo "$left" | tr '\n' ' ')"
    if [ -f "$state/rig.env" ]; then
        rm -rf "$state"
    fi
    return 0
}

case ${1:-} in
    up) shift; up "$@" ;;
    down) shift; down "$@" ;;
    __in-ns-dockerd) shift; in_ns_dockerd "$@" ;;
    *) usage ;;
esac
