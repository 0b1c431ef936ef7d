#!/usr/bin/env bash
# Install llmisvc, serve examples/default-scheduler.yaml on this machine and print the
# model's answer to one chat request sent through the gateway.
#
# Usage: bash scripts/quickstart.sh [--skip-setup]
#   --skip-setup  use the existing .venv (tests run this part in an isolated LLMISVC_HOME)
# Environment: LLMISVC_HOME (state, default ~/.llmisvc), LLMISVC_GATEWAY_PORT (default 8000).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" != "--skip-setup" ]; then
    bash "$repo/scripts/setup.sh"
fi
cd "$repo"

# Waits until all three replicas have loaded the model, printing their progress.
"$repo/.venv/bin/python" -m llmisvc.cli.main apply -f examples/default-scheduler.yaml

"$repo/.venv/bin/python" - <<'PYTHON'
import os

from openai import OpenAI

port = os.environ.get("LLMISVC_GATEWAY_PORT", "8000")
client = OpenAI(base_url=f"http://127.0.0.1:{port}/default/smollm2/v1", api_key="not-needed", timeout=300)
question = "What is Kubernetes? Answer in two sentences."
reply = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": question}],
    max_tokens=64,
    temperature=0,
)
print(f"Question: {question}")
print(f"Answer: {reply.choices[0].message.content.strip()}")
print(f"({reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} completion tokens)")
PYTHON

echo
echo "smollm2 keeps serving at http://127.0.0.1:${LLMISVC_GATEWAY_PORT:-8000}/v1 (model \"smollm2\")."
echo "Inspect it with '.venv/bin/llmisvc get' and '.venv/bin/llmisvc describe smollm2'; stop it with '.venv/bin/llmisvc delete smollm2'."
