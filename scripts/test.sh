#!/usr/bin/env bash
# The test command: set the machine up, lint, then run every test. With arguments,
# pytest runs just those; without, the unit tests run beside the integration and
# fault suites (which wait on containers and nginx more than they use a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-browser
.venv/bin/ruff check service tests bench playbooks roles inventory
.venv/bin/ansible-lint --profile production playbooks roles
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
fi
unit_log=$(mktemp)
trap 'rm -rf "$unit_log" /tmp/pytest-unit-$$ /tmp/pytest-live-$$' EXIT
.venv/bin/python -m pytest -p no:cacheprovider -q --basetemp=/tmp/pytest-unit-$$ \
    tests --ignore=tests/integration --ignore=tests/faults >"$unit_log" 2>&1 &
unit=$!
live_rc=0
.venv/bin/python -m pytest -p no:cacheprovider --basetemp=/tmp/pytest-live-$$ \
    tests/integration tests/faults || live_rc=$?
unit_rc=0
wait "$unit" || unit_rc=$?
echo "== unit tests (run beside the suites above) =="
cat "$unit_log"
[ "$live_rc" -eq 0 ] && [ "$unit_rc" -eq 0 ]
