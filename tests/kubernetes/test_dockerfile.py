"""The Dockerfile builds from the project's own files and runs real llmisvc commands; the
llmisvc containers in rendered manifests pass flags those commands accept.

No image can be pulled or built on the test machines, so these checks read the Dockerfile
instead of running `docker build`.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
from pathlib import Path

import pytest

from llmisvc.api import load_file, resolve
from llmisvc.cli.main import COMMANDS, build_parser
from llmisvc.runtime.kubernetes.install import install_manifests
from llmisvc.runtime.kubernetes.render import render_manifests
from support import LLMISVC, REPO

HERE = Path(__file__).parent


def instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs of the Dockerfile, continuations joined."""
    joined, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        joined.append(current)
        current = ""
    result = []
    for line in joined:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def ignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_copy_sources_exist():
    copies = [args for word, args in instructions() if word == "COPY"]
    assert copies
    checked = 0
    for args in copies:
        parts = shlex.split(args)
        if any(p.startswith("--from") for p in parts):
            continue
        sources = [p for p in parts[:-1] if not p.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY source {source} does not exist"
            assert not ignored(source), f"COPY source {source} is excluded by .dockerignore"
            checked += 1
    assert checked >= 3


def test_entrypoint_is_llmisvc_command():
    entry = dict((w, a) for w, a in instructions() if w in ("ENTRYPOINT", "CMD"))
    assert json.loads(entry["ENTRYPOINT"]) == ["llmisvc"]
    command = json.loads(entry["CMD"])
    assert command[0] in COMMANDS
    build_parser(command[0]).parse_args(command)
    result = subprocess.run(LLMISVC + [command[0], "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def llmisvc_containers(objects: list[dict]):
    for obj in objects:
        spec = obj.get("spec") or {}
        templates = [spec.get("template")]
        lws = spec.get("leaderWorkerTemplate") or {}
        templates += [lws.get("leaderTemplate"), lws.get("workerTemplate")]
        for template in filter(None, templates):
            pod = template.get("spec") or {}
            for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
                if (container.get("command") or [None])[0] == "llmisvc":
                    yield obj["metadata"]["name"], container


SPECS = sorted((HERE / "samples").glob("*.yaml")) + sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_rendered_commands_parse(path):
    resources = load_file(path)
    configs = {r.name: r for r in resources if r.kind == "LLMInferenceServiceConfig"}
    objects = []
    for resource in resources:
        if resource.kind == "LLMInferenceService":
            objects += render_manifests(resolve(resource, configs), owner_uid="uid")
    assert objects
    for owner, container in llmisvc_containers(objects):
        command = container["command"][1:] + container.get("args", [])
        assert command[0] in COMMANDS, f"{owner}/{container['name']}: unknown command {command[0]}"
        build_parser(command[0]).parse_args(command)


def test_operator_deployment_command_parses():
    containers = list(llmisvc_containers(install_manifests()))
    assert containers
    for _, container in containers:
        command = container["command"][1:] + container.get("args", [])
        build_parser(command[0]).parse_args(command)
