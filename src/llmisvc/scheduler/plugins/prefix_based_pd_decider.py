"""`prefix-based-pd-decider`: split a request into prefill and decode legs by uncached tokens.

Parameters:
- `nonCachedTokens` (int, default 0): minimum uncached prompt tokens on the chosen decode
  endpoint for the request to get a prefill leg; 0 splits every request.

Formula: split when `uncached_tokens >= nonCachedTokens`, where `pd-profile-handler`
computes `uncached_tokens` for the decode pick: exact from engine KV events when the
precise prefix-cache scorer has them, else uncached prompt characters / 4 from the
approximate prefix index. A handler that names this decider ignores its own `threshold`.
"""

from __future__ import annotations

from llmisvc.scheduler.framework import LifecycleHooks, Plugin
from llmisvc.scheduler.registry import Param, non_negative


class PrefixBasedPDDecider(Plugin, LifecycleHooks):
    """Decides prefill/decode disaggregation from the uncached prompt length."""

    type_name = "prefix-based-pd-decider"
    kind = "decider"
    PARAMETERS = (Param("nonCachedTokens", (int,), 0, non_negative, "uncached tokens that trigger a prefill leg"),)

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.non_cached_tokens = parameters["nonCachedTokens"]

    def should_split(self, uncached_tokens: float) -> bool:
        """Return True when a request with `uncached_tokens` should run a prefill leg."""
        return uncached_tokens >= self.non_cached_tokens
