#!/usr/bin/env bash
# The demo: set the machine up, then drive a signed Stripe checkout into a
# live store behind a local nginx, and say where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m provisioner.testing.demo "$@"
