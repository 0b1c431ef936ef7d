"""Plugin registry: config type name -> plugin class, imported when first used.

Adding a plugin is one module under `llmisvc.scheduler.plugins` plus one entry here.
Each class declares `kind` (filter, scorer, picker or profile-handler) and
`PARAMETERS`, which the config loader checks before anything starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmisvc.scheduler.datastore import Datastore
    from llmisvc.scheduler.metrics import SchedulerMetrics
    from llmisvc.protocol.prompt_text import ChatRenderer

PLUGINS: dict[str, str] = {
    "single-profile-handler": "llmisvc.scheduler.plugins.single_profile_handler:SingleProfileHandler",
    "prefill-filter": "llmisvc.scheduler.plugins.role_filter:PrefillFilter",
    "decode-filter": "llmisvc.scheduler.plugins.role_filter:DecodeFilter",
    "label-selector-filter": "llmisvc.scheduler.plugins.label_selector_filter:LabelSelectorFilter",
    "utilization-detector": "llmisvc.scheduler.plugins.utilization_detector:UtilizationDetector",
    "prefix-cache-scorer": "llmisvc.scheduler.plugins.prefix_cache_scorer:PrefixCacheScorer",
    "precise-prefix-cache-scorer": "llmisvc.scheduler.plugins.precise_prefix_cache_scorer:PrecisePrefixCacheScorer",
    "load-aware-scorer": "llmisvc.scheduler.plugins.load_aware_scorer:LoadAwareScorer",
    "queue-scorer": "llmisvc.scheduler.plugins.queue_scorer:QueueScorer",
    "kv-cache-utilization-scorer": "llmisvc.scheduler.plugins.kv_cache_utilization_scorer:KVCacheUtilizationScorer",
    "active-request-scorer": "llmisvc.scheduler.plugins.active_request_scorer:ActiveRequestScorer",
    "session-affinity-scorer": "llmisvc.scheduler.plugins.session_affinity_scorer:SessionAffinityScorer",
    "no-hit-lru-scorer": "llmisvc.scheduler.plugins.no_hit_lru_scorer:NoHitLRUScorer",
    "max-score-picker": "llmisvc.scheduler.plugins.max_score_picker:MaxScorePicker",
    "random-picker": "llmisvc.scheduler.plugins.random_picker:RandomPicker",
    "weighted-random-picker": "llmisvc.scheduler.plugins.weighted_random_picker:WeightedRandomPicker",
    "pd-profile-handler": "llmisvc.scheduler.plugins.pd_profile_handler:PDProfileHandler",
    "prefix-based-pd-decider": "llmisvc.scheduler.plugins.prefix_based_pd_decider:PrefixBasedPDDecider",
}

KINDS = ("filter", "scorer", "picker", "profile-handler", "decider")


@dataclass(frozen=True)
class Param:
    """One plugin parameter: accepted JSON types, default, and an optional value check.

    `check(value)` returns None when the value is valid, else the reason it is not.
    """

    name: str
    types: tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None
    help: str = ""


@dataclass
class PluginContext:
    """Shared objects of one service that a plugin may use when it is built."""

    datastore: "Datastore"
    model_name: str
    service: str
    metrics: "SchedulerMetrics"
    renderer: "ChatRenderer"
    seed: int | None = None


def plugin_class(type_name: str) -> type:
    """Return the class registered for `type_name`; raise KeyError when none is."""
    target = PLUGINS[type_name]
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def positive(value: Any) -> str | None:
    """Check for a number greater than zero."""
    return None if value > 0 else f"must be > 0, got {value}"


def non_negative(value: Any) -> str | None:
    """Check for a number of zero or more."""
    return None if value >= 0 else f"must be >= 0, got {value}"


def fraction(value: Any) -> str | None:
    """Check for a number in [0, 1]."""
    return None if 0 <= value <= 1 else f"must be between 0 and 1, got {value}"


def string_map(value: Mapping) -> str | None:
    """Check for a mapping of strings to strings."""
    if all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return "must map strings to strings"
