"""Plugin interfaces of the scheduler and the values passed between them.

In a scheduling cycle the profile handler names the profiles to run. Each profile runs
its filters in order (an empty result fails the profile), then its scorers (each returns
values in [0, 1], and the total is the sum of weight x score), then its picker. The handler may run further profiles after seeing results (for
example a prefill profile after the decode pick) and finally turns the profile results
into one `SchedulingResult`.

Plugins that keep state hear about picks (`on_pick`), finished requests
(`on_request_finished`) and removed endpoints (`on_endpoint_removed`) through
`LifecycleHooks`. The scheduler calls each hook of every plugin that defines it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from llmisvc.protocol.errors import ServiceUnavailableError, TooManyRequestsError

if TYPE_CHECKING:
    from llmisvc.scheduler.datastore import Datastore, Endpoint


class NoReadyEndpoints(ServiceUnavailableError):
    """No ready endpoint exists in the pool a profile needs (HTTP 503)."""


class AllFiltered(TooManyRequestsError):
    """Every candidate endpoint was filtered out (HTTP 429 with a drop reason)."""

    def __init__(self, message: str, *, profile: str, plugin: str):
        super().__init__(message, drop_reason=f"filtered:{profile}/{plugin}")
        self.profile = profile
        self.plugin = plugin


@dataclass
class SchedulingRequest:
    """Request data the scheduler uses.

    `prompt_text` is the text the engine will process, when the caller already has it.
    Otherwise the scheduler derives it from `body`: the completions `prompt`, or chat
    `messages` rendered with the chat template. `headers` have lower-case names.
    """

    request_id: str
    model: str
    prompt_text: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] | None = None


class CycleState:
    """Per-request scratch space shared by the plugins of one scheduling cycle.

    Plugins store derived data here (block hashes, match counts) under their own names,
    so a value computed by one plugin is reused by the next.
    """

    def __init__(self, request: SchedulingRequest, prompt_text: str, datastore: "Datastore"):
        self.request = request
        self.prompt_text = prompt_text
        self.datastore = datastore
        self.values: dict[str, Any] = {}


@dataclass
class ProfileResult:
    """Outcome of one profile: chosen endpoints (best first) and every candidate's scores.

    `plugin_scores` maps scorer name -> address -> clamped score; `totals` maps address
    -> weighted sum.
    """

    targets: list["Endpoint"]
    plugin_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """Address -> scorer name -> score (built on demand, for logs and tests)."""
        view: dict[str, dict[str, float]] = {address: {} for address in self.totals}
        for plugin, values in self.plugin_scores.items():
            for address, value in values.items():
                view[address][plugin] = value
        return view


@dataclass
class SchedulingResult:
    """Outcome of a scheduling cycle.

    `target` serves the request (the decode endpoint in prefill/decode), `prefill` runs
    the prefill leg or is None. `scores` maps profile -> endpoint -> plugin -> score, for
    the decision log. `response_headers` are set on the client's response (session
    affinity tokens).
    """

    target: "Endpoint"
    prefill: "Endpoint | None" = None
    primary_profile: str = ""
    profile_results: dict[str, ProfileResult | None] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)

    @property
    def scores(self) -> dict[str, dict[str, dict[str, float]]]:
        """Scores of every profile that ran, for the decision log."""
        return {name: result.scores for name, result in self.profile_results.items() if result is not None}


@dataclass
class WeightedScorer:
    """A scorer with its weight in one profile."""

    scorer: "Scorer"
    weight: float


@dataclass
class SchedulerProfile:
    """Filters, weighted scorers and a picker, run in that order."""

    name: str
    filters: list["Filter"]
    scorers: list[WeightedScorer]
    picker: "Picker"


class Plugin:
    """Base of every plugin: a config `type_name` and an instance `name`."""

    type_name: str = ""

    def __init__(self, name: str):
        self.name = name


@runtime_checkable
class Filter(Protocol):
    """Removes candidates that must not serve the request."""

    name: str

    def filter(self, state: CycleState, endpoints: Sequence["Endpoint"]) -> list["Endpoint"]: ...


@runtime_checkable
class Scorer(Protocol):
    """Scores candidates in [0, 1]; higher is better. Returns address -> score."""

    name: str

    def score(self, state: CycleState, endpoints: Sequence["Endpoint"]) -> dict[str, float]: ...


@runtime_checkable
class Picker(Protocol):
    """Chooses targets from scored candidates (best first)."""

    name: str

    def pick(self, state: CycleState, scored: Sequence[tuple["Endpoint", float]]) -> list["Endpoint"]: ...


@runtime_checkable
class ProfileHandler(Protocol):
    """Chooses which profiles run and combines their results."""

    name: str

    def pick_profiles(
        self, state: CycleState, profiles: Mapping[str, SchedulerProfile], results: Mapping[str, ProfileResult | None]
    ) -> list[str]:
        """Return the profiles to run next; an empty list ends the cycle."""
        ...

    def process_results(self, state: CycleState, results: Mapping[str, ProfileResult | None]) -> SchedulingResult:
        """Combine profile results into the final result; raise when the request cannot be served."""
        ...


class LifecycleHooks:
    """Optional hooks a plugin may implement; the defaults do nothing."""

    def on_pick(self, state: CycleState, result: SchedulingResult) -> None:
        """Record a decision (for example add the prompt's blocks to the chosen endpoint's index)."""

    def on_request_finished(self, address: str, request_id: str) -> None:
        """Record that a request left an endpoint."""

    def on_endpoint_removed(self, address: str) -> None:
        """Forget everything about an endpoint that left the pool."""

    def start(self) -> None:
        """Start background work (event subscribers); called once by the scheduler."""

    def close(self) -> None:
        """Stop background work."""


def clamp(score: float) -> float:
    """Return `score` limited to [0, 1]."""
    if score < 0.0:
        return 0.0
    if score > 1.0:
        return 1.0
    return score
