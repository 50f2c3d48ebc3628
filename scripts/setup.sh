#!/usr/bin/env bash
# Make this machine ready to run the provisioner, its demo and its tests:
# Debian packages (docker.io, nginx, busybox-static, openssl) when missing,
# a Docker engine when none answers, a venv in .venv with the package
# installed, and the stand-in eBuilder image. Safe to run again.
# Usage: scripts/setup.sh [--with-browser]   (the browser, Pebble, PostgreSQL and sshd
# are for the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "setup: $*"; }
with_browser=0
[ "${1:-}" = "--with-browser" ] && with_browser=1

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
static_busybox() { { ldd "$(command -v busybox)" 2>&1 || true; } | grep -q "not a dynamic"; }
if ! command -v busybox >/dev/null 2>&1 || ! static_busybox; then
    need+=(busybox-static)
fi
# sshd for the hosts of the multi-host tests: scripts/netns-hosts.sh starts one in each
# network namespace. The service stays off (Debian's switch, which ssh.service,
# ssh.socket and /etc/init.d/ssh obey): no sshd listens on this machine itself.
if [ $with_browser = 1 ] && [ ! -x /usr/sbin/sshd ]; then
    mkdir -p /etc/ssh
    touch /etc/ssh/sshd_not_to_be_run
    need+=(openssh-server)
fi
if [ $with_browser = 1 ] && [ ! -x /usr/bin/chromium ]; then
    need+=(chromium)
fi
# A PostgreSQL server for the tests of the service on PostgreSQL (tests/postgres.py).
if [ $with_browser = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need+=(postgresql)
fi
# Let's Encrypt's test ACME server, for the custom-domain tests.
if [ $with_browser = 1 ] && ! command -v pebble >/dev/null 2>&1; then
    need+=(pebble)
fi
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    mkdir -p /var/log
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start, see /var/log/dockerd.log" >&2; exit 1; }
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$python" -m venv .venv
fi
log "installing Python dependencies"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import provisioner, ansible_runner, aiosmtpd" \
    || { echo "setup: Python dependencies did not install" >&2; exit 1; }

# Once the venv is active, ansible-playbook and ansible-inventory use this project's
# ansible.cfg (its inventory, roles, strict inventory parsing) from any directory.
sed -i '/# ebuilder-provisioner: ansible.cfg/d' .venv/bin/activate
echo "export ANSIBLE_CONFIG=$PWD/ansible.cfg  # ebuilder-provisioner: ansible.cfg" \
    >> .venv/bin/activate

image/build.sh "${EBUILDER_IMAGE:-ebuilder-standin:latest}"
log "ready"
