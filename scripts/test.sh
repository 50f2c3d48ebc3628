#!/usr/bin/env bash
# The test command: set the machine up, lint, then run every test (arguments go to
# pytest, e.g. `scripts/test.sh -k webhook`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-browser
.venv/bin/ruff check service tests bench playbooks roles inventory
# Syntax checks need the Docker hosts only, not the DB's stores (whose inventory script
# fails, on purpose, without the service's settings).
ANSIBLE_INVENTORY=inventory/hosts.yml .venv/bin/ansible-lint --profile production playbooks roles
.venv/bin/python -m pytest -p no:cacheprovider "$@"
