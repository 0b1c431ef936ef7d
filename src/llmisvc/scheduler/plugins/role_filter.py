"""`prefill-filter` and `decode-filter`: keep endpoints by their `llm-d.ai/role` label.

Parameters: none.
`prefill-filter` keeps endpoints whose role is `prefill`. `decode-filter` keeps roles
`decode` and `both`, and endpoints without the label (a plain replica can decode).
"""

from __future__ import annotations

from collections.abc import Sequence

from llmisvc.scheduler.datastore import ROLE_LABEL, Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin


class PrefillFilter(Plugin, LifecycleHooks):
    """Keeps prefill endpoints."""

    type_name = "prefill-filter"
    kind = "filter"
    PARAMETERS = ()

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)

    def filter(self, state: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if e.labels.get(ROLE_LABEL) == "prefill"]


class DecodeFilter(Plugin, LifecycleHooks):
    """Keeps decode, both-role and unlabelled endpoints."""

    type_name = "decode-filter"
    kind = "filter"
    PARAMETERS = ()

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)

    def filter(self, state: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if e.labels.get(ROLE_LABEL) in (None, "", "decode", "both")]
