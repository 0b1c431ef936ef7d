"""Builders of LLMInferenceService documents for the api tests."""

import copy

import yaml

from support import REPO

EXAMPLES = REPO / "examples"
SHAPE_FILES = ("default-scheduler.yaml", "no-scheduler.yaml", "prefill-decode.yaml")
MODEL_URI = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"


def minimal_service(version: str = "v1alpha2", name: str = "svc", **spec) -> dict:
    """Return a small valid LLMInferenceService document with `spec` fields added."""
    return {
        "apiVersion": f"serving.kserve.io/{version}",
        "kind": "LLMInferenceService",
        "metadata": {"name": name},
        "spec": {"model": {"uri": MODEL_URI}, **copy.deepcopy(spec)},
    }


def config(name: str, version: str = "v1alpha2", **spec) -> dict:
    """Return an LLMInferenceServiceConfig document."""
    return {
        "apiVersion": f"serving.kserve.io/{version}",
        "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": name},
        "spec": copy.deepcopy(spec),
    }


def dump(*documents: dict) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


