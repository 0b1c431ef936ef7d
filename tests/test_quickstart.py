"""The README's first command, without its install step, in an isolated LLMISVC_HOME."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from support import REPO, free_port, pids_with_env, run_cli

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(960)
def test_quickstart_prints_answer(tmp_path):
    home = tmp_path / "home"
    env = {"LLMISVC_HOME": str(home), "LLMISVC_GATEWAY_PORT": str(free_port())}
    try:
        result = subprocess.run(
            ["bash", str(REPO / "scripts" / "quickstart.sh"), "--skip-setup"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "llminferenceservice.serving.kserve.io/smollm2 ready" in result.stdout
        answer = re.search(r"^Answer: (.+)$", result.stdout, re.MULTILINE)
        assert answer is not None, result.stdout
        assert len(answer.group(1).split()) >= 3
        usage = re.search(r"\((\d+) prompt tokens, (\d+) completion tokens\)", result.stdout)
        assert usage is not None
        assert 0 < int(usage.group(2)) <= 64
    finally:
        deleted = run_cli(["delete", "smollm2"], env, timeout=120)
        deadline = time.monotonic() + 60
        while pids_with_env("LLMISVC_HOME", str(home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = pids_with_env("LLMISVC_HOME", str(home))
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
    assert deleted.returncode == 0, deleted.stderr
    assert leftover == []
