"""`single-profile-handler`: run the config's only profile once and use its pick.

Parameters: none.
Result: the profile's first target; when the profile failed, its error is raised
(`AllFiltered` -> 429, `NoReadyEndpoints` -> 503).
"""

from __future__ import annotations

from collections.abc import Mapping

from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin, ProfileResult, SchedulerProfile, SchedulingResult


class SingleProfileHandler(Plugin, LifecycleHooks):
    """Runs one profile."""

    type_name = "single-profile-handler"
    kind = "profile-handler"
    PARAMETERS = ()

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)

    def pick_profiles(self, state: CycleState, profiles: Mapping[str, SchedulerProfile], results: Mapping[str, ProfileResult | None]) -> list[str]:
        if results:
            return []
        return [next(iter(profiles))]

    def process_results(self, state: CycleState, results: Mapping[str, ProfileResult | None]) -> SchedulingResult:
        name, result = next(iter(results.items()))
        if result is None:
            raise state.values["profile_errors"][name]
        return SchedulingResult(target=result.targets[0], primary_profile=name, profile_results=dict(results))
