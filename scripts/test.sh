#!/usr/bin/env bash
# The test command: set the machine up, lint, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-browser
.venv/bin/ruff check service tests bench inventory
.venv/bin/ansible-lint --profile production playbooks roles
.venv/bin/python -m pytest -p no:cacheprovider "$@"
