"""`pd-profile-handler`: run the decode profile, then the prefill profile when it pays.

Parameters:
- `threshold` (int, default 0): uncached prompt tokens on the decode pick at or above which
  the request gets a prefill leg; 0 splits every request.
- `hashBlockSize` (int, default 64): accepted for llm-d compatibility; prefix matches come
  from the prefix-cache scorers, whose own block size applies.
- `prefillProfile` (str, default `prefill`), `decodeProfile` (str, default `decode`): the
  profile names.
- `deciderPluginName` (str, default empty): a `prefix-based-pd-decider` plugin whose
  `nonCachedTokens` decides instead of `threshold`. When empty and the config has exactly
  one plugin of that type, that one is used (the decider takes precedence).
- `primaryPort` (int, default 0): accepted for llm-d compatibility; the gateway routes to
  the decode endpoint's own port.

Order and formula: the decode profile runs first and its pick is the primary target. Then
`uncached_tokens` for that endpoint is computed, exactly as `prompt_tokens - matched blocks x
block size` when the precise prefix-cache scorer left engine KV-event matches in the cycle
state, else as `uncached prompt characters / 4` from the approximate prefix index (all
characters when no index ran). The prefill profile runs when the decider (or `threshold`)
decides to split. A split whose prefill profile finds no endpoint fails with 503 naming the
prefill pool: an always-split service never degrades silently to decode-only here (a
prefill leg that fails later falls back in the gateway, counted). Both picks are recorded
by the prefix-cache scorer's `on_pick` (target and prefill).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmisvc.scheduler.config import ConfigError
from llmisvc.scheduler.framework import (
    AllFiltered,
    CycleState,
    LifecycleHooks,
    NoReadyEndpoints,
    Plugin,
    ProfileResult,
    SchedulerProfile,
    SchedulingResult,
)
from llmisvc.scheduler.registry import Param, non_negative, positive

# What the prefix-cache scorers leave in the cycle state: the approximate one a match object
# with `uncached_chars(address, prompt_chars)`, the precise one a tuple (prompt tokens,
# matched blocks by address, block size in tokens).
_APPROXIMATE_KEY = "prefix-cache"
_PRECISE_KEY = "precise-prefix-cache"
# The approximate index's characters-per-token estimate.
CHARS_PER_TOKEN = 4
DECISION_KEY = "pd-decision"


class PDProfileHandler(Plugin, LifecycleHooks):
    """Decode profile first and primary; prefill profile when uncached tokens reach the bar."""

    type_name = "pd-profile-handler"
    kind = "profile-handler"
    PARAMETERS = (
        Param("threshold", (int,), 0, non_negative, "uncached tokens that trigger a prefill leg (0: always)"),
        Param("hashBlockSize", (int,), 64, positive, "accepted for llm-d compatibility"),
        Param("prefillProfile", (str,), "prefill"),
        Param("decodeProfile", (str,), "decode"),
        Param("deciderPluginName", (str,), ""),
        Param("primaryPort", (int,), 0, non_negative),
    )

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.threshold = parameters["threshold"]
        self.hash_block_size = parameters["hashBlockSize"]
        self.prefill_profile = parameters["prefillProfile"]
        self.decode_profile = parameters["decodeProfile"]
        self.decider_name = parameters["deciderPluginName"]
        self.decider: Any = None

    def resolve_plugins(self, plugins: Mapping[str, Any], profiles: Mapping[str, Any]) -> None:
        """Find the decider and check the profile names; raise ConfigError when one is missing."""
        for profile in (self.decode_profile, self.prefill_profile):
            if profile not in profiles:
                raise ConfigError(f"plugin {self.name!r}: no scheduling profile named {profile!r}", plugin=self.name)
        if self.decider_name:
            decider = plugins.get(self.decider_name)
            if decider is None or not hasattr(decider, "should_split"):
                raise ConfigError(
                    f"plugin {self.name!r}: deciderPluginName {self.decider_name!r} names no decider plugin",
                    plugin=self.name,
                    parameter="deciderPluginName",
                )
            self.decider = decider
            return
        deciders = [plugin for plugin in plugins.values() if hasattr(plugin, "should_split")]
        if len(deciders) == 1:
            self.decider = deciders[0]

    def pick_profiles(
        self, state: CycleState, profiles: Mapping[str, SchedulerProfile], results: Mapping[str, ProfileResult | None]
    ) -> list[str]:
        if not results:
            return [self.decode_profile]
        if self.prefill_profile in results:
            return []
        decode = results.get(self.decode_profile)
        if decode is None or not decode.targets:
            return []

        uncached, exact = self.uncached_tokens(state, decode.targets[0].address)
        split = self.decider.should_split(uncached) if self.decider is not None else uncached >= self.threshold
        state.values[DECISION_KEY] = {"uncached_tokens": uncached, "exact": exact, "split": split}
        return [self.prefill_profile] if split else []

    def process_results(self, state: CycleState, results: Mapping[str, ProfileResult | None]) -> SchedulingResult:
        decode = results.get(self.decode_profile)
        if decode is None or not decode.targets:
            raise state.values["profile_errors"][self.decode_profile]

        prefill_target = None
        if self.prefill_profile in results:
            prefill = results[self.prefill_profile]
            if prefill is None or not prefill.targets:
                error = state.values.get("profile_errors", {}).get(self.prefill_profile)
                raise NoReadyEndpoints(
                    f"no ready endpoint in the prefill pool (profile {self.prefill_profile!r}) "
                    f"for a request that needs a prefill leg: {_describe(error)}"
                )
            prefill_target = prefill.targets[0]
        return SchedulingResult(
            target=decode.targets[0],
            prefill=prefill_target,
            primary_profile=self.decode_profile,
            profile_results=dict(results),
        )

    def uncached_tokens(self, state: CycleState, address: str) -> tuple[float, bool]:
        """Return (uncached prompt tokens on `address`, whether the count is exact)."""
        precise = state.values.get(_PRECISE_KEY)
        if precise is not None:
            prompt_tokens, matched_blocks, block_size = precise
            return float(max(prompt_tokens - matched_blocks.get(address, 0) * block_size, 0)), True

        prompt_chars = len(state.prompt_text)
        approximate = state.values.get(_APPROXIMATE_KEY)
        if approximate is not None and hasattr(approximate, "uncached_chars"):
            return approximate.uncached_chars(address, prompt_chars) / CHARS_PER_TOKEN, False
        return prompt_chars / CHARS_PER_TOKEN, False


def _describe(error: Exception | None) -> str:
    if error is None:
        return "the profile picked no endpoint"
    if isinstance(error, AllFiltered):
        return f"every prefill endpoint was filtered out by {error.plugin}"
    return str(error)
