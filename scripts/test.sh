#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (end-to-end tests included).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest -q "$@"
