"""Well-known LLMInferenceServiceConfig presets shipped as YAML data, and their selection.

The spec's shape decides which presets apply, in this order:

1. the main pod template, or the decode template when `prefill` is set;
2. data-parallel workers when `parallelism.data` or `dataLocal` is set;
3. the prefill template and its data-parallel workers when `prefill` is set;
4. the scheduler when `router.scheduler` is present without `pool.ref`;
5. the route when `router.route` is present without `http.refs`.
"""

from __future__ import annotations

import functools
from importlib import resources

from llmisvc.api.load import Resource, load_documents

MAIN_TEMPLATE = "kserve-config-llm-template"
DECODE_TEMPLATE = "kserve-config-llm-decode-template"
PREFILL_TEMPLATE = "kserve-config-llm-prefill-template"
WORKER_DATA_PARALLEL = "kserve-config-llm-worker-data-parallel"
PREFILL_WORKER_DATA_PARALLEL = "kserve-config-llm-prefill-worker-data-parallel"
SCHEDULER = "kserve-config-llm-scheduler"
ROUTE_TO_POOL = "kserve-config-llm-router-route"
ROUTE_TO_SERVICE = "kserve-config-llm-router-route-service"
PRESET_NAMES = (
    MAIN_TEMPLATE, DECODE_TEMPLATE, PREFILL_TEMPLATE, WORKER_DATA_PARALLEL,
    PREFILL_WORKER_DATA_PARALLEL, SCHEDULER, ROUTE_TO_POOL, ROUTE_TO_SERVICE,
)


@functools.cache
def load_presets() -> dict[str, Resource]:
    """Return every shipped preset by name, validated like a user's config."""
    package = resources.files(__name__)
    presets: dict[str, Resource] = {}
    for name in PRESET_NAMES:
        text = package.joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        (resource,) = load_documents(text)
        presets[resource.name] = resource
    return presets


def _is_data_parallel(workload: dict) -> bool:
    parallelism = workload.get("parallelism") or {}
    return "data" in parallelism or "dataLocal" in parallelism


def select_presets(spec: dict) -> list[str]:
    """Return the names of the presets that apply to `spec`, in merge order."""
    names: list[str] = []
    prefill = spec.get("prefill")
    names.append(DECODE_TEMPLATE if prefill is not None else MAIN_TEMPLATE)
    if _is_data_parallel(spec):
        names.append(WORKER_DATA_PARALLEL)
    if prefill is not None:
        names.append(PREFILL_TEMPLATE)
        if _is_data_parallel(prefill):
            names.append(PREFILL_WORKER_DATA_PARALLEL)

    router = spec.get("router") or {}
    scheduler = router.get("scheduler")
    if scheduler is not None and not (scheduler.get("pool") or {}).get("ref"):
        names.append(SCHEDULER)
    route = router.get("route")
    if route is not None and not (route.get("http") or {}).get("refs"):
        names.append(ROUTE_TO_POOL if scheduler is not None else ROUTE_TO_SERVICE)
    return names
