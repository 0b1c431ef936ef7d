"""The scheduler: runs a configured plugin pipeline per request, or plain round robin.

`Scheduler.from_config` builds either pipeline behind one `schedule()` call, so the
gateway treats every deployment shape alike. The scheduler derives the prompt text the
engine will see: the completions `prompt`, or chat `messages` rendered with the chat
template. It then runs the profile handler's profiles and lets stateful plugins learn
the pick. Each decision is recorded in metrics and in one debug log line with the scores.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from typing import Any

from llmisvc.protocol.prompt_text import ChatRenderer
from llmisvc.scheduler import registry
from llmisvc.scheduler import config as config_module
from llmisvc.scheduler.config import DEFAULT_CONFIG, ConfigError, EndpointPickerConfig, parse_config
from llmisvc.scheduler.datastore import Datastore, Endpoint
from llmisvc.scheduler.framework import (
    AllFiltered,
    CycleState,
    NoReadyEndpoints,
    ProfileResult,
    SchedulerProfile,
    SchedulingRequest,
    SchedulingResult,
    WeightedScorer,
    clamp,
)
from llmisvc.scheduler.metrics import SchedulerMetrics

logger = logging.getLogger(__name__)

SHAPES = ("scheduler", "no-scheduler", "pd")


def prompt_text(request: SchedulingRequest, renderer: ChatRenderer) -> str:
    """Return the text the engine will process for `request` ("" when the body has no prompt)."""
    if request.prompt_text is not None:
        return request.prompt_text
    body = request.body or {}
    messages = body.get("messages")
    if isinstance(messages, list):
        try:
            return renderer.render(messages, bool(body.get("add_generation_prompt", True)))
        except ValueError as exc:
            # The engine will reject the request with a clear error; routing needs no text.
            logger.debug("request %s: chat template failed: %s", request.request_id, exc)
            return ""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt[0]
    return ""


class Scheduler:
    """Runs an EndpointPickerConfig's profiles over a service's endpoints."""

    def __init__(
        self,
        config: EndpointPickerConfig,
        datastore: Datastore,
        model_name: str,
        service: str = "",
        chat_template: str | None = None,
        metrics: SchedulerMetrics | None = None,
        seed: int | None = None,
    ):
        self.config = config
        self.datastore = datastore
        self.model_name = model_name
        self.service = service or model_name
        self.renderer = ChatRenderer(chat_template)
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        context = registry.PluginContext(datastore, model_name, self.service, self.metrics, self.renderer, seed)

        self.plugins: dict[str, Any] = {}
        for spec in config.plugins.values():
            self.plugins[spec.name] = registry.plugin_class(spec.type)(spec.name, spec.parameters, context)
        self.handler = self.plugins[config.handler]
        self.profiles: dict[str, SchedulerProfile] = {
            profile.name: SchedulerProfile(
                name=profile.name,
                filters=[self.plugins[name] for name in profile.filters],
                scorers=[WeightedScorer(self.plugins[name], weight) for name, weight in profile.scorers],
                picker=self.plugins[profile.picker],
            )
            for profile in config.profiles
        }
        for plugin in self.plugins.values():
            # Plugins that refer to other plugins or profiles by name (pd-profile-handler and
            # its decider) look them up once everything is built.
            resolve = getattr(plugin, "resolve_plugins", None)
            if resolve is not None:
                resolve(self.plugins, self.profiles)
        self._e2e = self.metrics.e2e_duration.labels(self.service)
        self._timers: dict[tuple[str, str], Any] = {}
        datastore.add_removal_listener(self._forget_endpoint)
        for plugin in self.plugins.values():
            plugin.start()

    @classmethod
    def from_config(
        cls,
        config: str | Mapping[str, Any] | None,
        shape: str = "scheduler",
        datastore: Datastore | None = None,
        model_name: str = "",
        **kwargs: Any,
    ) -> "Scheduler | RoundRobinScheduler":
        """Build the scheduler for a deployment shape; raise ConfigError for a bad config.

        `shape` "no-scheduler" gives round robin over ready endpoints (the config must be
        None); "scheduler" and "pd" use `config`, or the shape's default when None.
        Extra keyword arguments go to the constructor (service, chat_template, metrics, seed).
        """
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
        datastore = datastore if datastore is not None else Datastore()
        if shape == "no-scheduler":
            return RoundRobinScheduler(datastore, model_name, **kwargs)
        if config is None and shape == "pd":
            config = getattr(config_module, "DEFAULT_PD_CONFIG", None)
            if config is None:
                raise ConfigError("the prefill/decode shape needs a default config with pd-profile-handler; none is registered")
        parsed = parse_config(config if config is not None else DEFAULT_CONFIG)
        return cls(parsed, datastore, model_name, **kwargs)

    # ------------------------------------------------------------ decisions

    def schedule(self, request: SchedulingRequest) -> SchedulingResult:
        """Choose endpoints for `request`.

        Raises NoReadyEndpoints (503) when the pool has no ready endpoint and AllFiltered
        (429) when a required profile filtered out every candidate.
        """
        started = time.perf_counter()
        candidates = self.datastore.candidates()
        if not candidates:
            self.metrics.failures.labels(self.service, "no_ready_endpoints").inc()
            raise NoReadyEndpoints(f"no ready endpoint for model {request.model or self.model_name}")

        state = CycleState(request, prompt_text(request, self.renderer), self.datastore)
        state.values["profile_errors"] = {}
        results: dict[str, ProfileResult | None] = {}
        try:
            while True:
                names = self.handler.pick_profiles(state, self.profiles, results)
                names = [name for name in names if name not in results]
                if not names:
                    break
                for name in names:
                    results[name] = self._run_profile(state, self.profiles[name], candidates)
            result = self.handler.process_results(state, results)
        except (AllFiltered, NoReadyEndpoints) as exc:
            reason = "all_filtered" if isinstance(exc, AllFiltered) else "no_ready_endpoints"
            self.metrics.failures.labels(self.service, reason).inc()
            raise

        for plugin in self.plugins.values():
            plugin.on_pick(state, result)
        self.metrics.picks.labels(self.service, result.primary_profile, result.target.address).inc()
        if result.prefill is not None:
            self.metrics.picks.labels(self.service, "prefill", result.prefill.address).inc()
        self._e2e.observe(time.perf_counter() - started)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "request %s -> %s%s scores=%s",
                request.request_id,
                result.target.address,
                f" prefill={result.prefill.address}" if result.prefill else "",
                result.scores,
            )
        return result

    def _run_profile(self, state: CycleState, profile: SchedulerProfile, candidates: list[Endpoint]) -> ProfileResult | None:
        """Run one profile; return None and store the error in state when it cannot pick."""
        endpoints = candidates
        for plugin in profile.filters:
            started = time.perf_counter()
            endpoints = plugin.filter(state, endpoints)
            self._observe(profile.name, plugin, started)
            if not endpoints:
                state.values["profile_errors"][profile.name] = AllFiltered(
                    f"every endpoint was filtered out by {plugin.name} in profile {profile.name}",
                    profile=profile.name,
                    plugin=plugin.name,
                )
                return None

        plugin_scores: dict[str, dict[str, float]] = {}
        totals = {e.address: 0.0 for e in endpoints}
        for weighted in profile.scorers:
            started = time.perf_counter()
            values = weighted.scorer.score(state, endpoints)
            self._observe(profile.name, weighted.scorer, started)
            clamped = plugin_scores[weighted.scorer.name] = {address: clamp(value) for address, value in values.items()}
            weight = weighted.weight
            for address, value in clamped.items():
                totals[address] += weight * value

        started = time.perf_counter()
        targets = profile.picker.pick(state, [(e, totals[e.address]) for e in endpoints])
        self._observe(profile.name, profile.picker, started)
        return ProfileResult(targets=targets, plugin_scores=plugin_scores, totals=totals)

    def _observe(self, profile: str, plugin: Any, started: float) -> None:
        key = (profile, plugin.name)
        timer = self._timers.get(key)
        if timer is None:
            timer = self._timers[key] = self.metrics.plugin_duration.labels(self.service, profile, plugin.type_name, plugin.name)
        timer.observe(time.perf_counter() - started)

    # ------------------------------------------------------------ state

    def saturated(self) -> bool:
        """Return True when every candidate is saturated by the utilization-detector's thresholds.

        Without a utilization-detector in the config, an endpoint counts as saturated only
        when its metrics are stale. The gateway uses this for admission control.
        """
        candidates = self.datastore.candidates()
        if not candidates:
            return True
        detectors = [p for p in self.plugins.values() if p.type_name == "utilization-detector"]
        if detectors:
            return all(detectors[0].is_saturated(self.datastore, e) for e in candidates)
        return all(self.datastore.is_stale(e) for e in candidates)

    def request_finished(self, address: str, request_id: str = "") -> None:
        """Tell stateful plugins that a request left `address` (in-flight counts live in the datastore)."""
        for plugin in self.plugins.values():
            plugin.on_request_finished(address, request_id)

    def _forget_endpoint(self, address: str) -> None:
        self.metrics.remove_endpoint(self.service, address)

    def close(self) -> None:
        """Stop plugins' background work (KV event subscribers)."""
        for plugin in self.plugins.values():
            plugin.close()


class RoundRobinScheduler:
    """Round robin over ready endpoints: the no-scheduler shape, with the same interface."""

    def __init__(
        self,
        datastore: Datastore,
        model_name: str = "",
        service: str = "",
        metrics: SchedulerMetrics | None = None,
        **_: Any,
    ):
        self.datastore = datastore
        self.model_name = model_name
        self.service = service or model_name
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        self._counter = itertools.count()
        self._e2e = self.metrics.e2e_duration.labels(self.service)
        datastore.add_removal_listener(lambda address: self.metrics.remove_endpoint(self.service, address))

    def schedule(self, request: SchedulingRequest) -> SchedulingResult:
        """Return the next ready endpoint in address order; raise NoReadyEndpoints when none."""
        started = time.perf_counter()
        candidates = sorted(self.datastore.candidates(), key=lambda e: e.address)
        if not candidates:
            self.metrics.failures.labels(self.service, "no_ready_endpoints").inc()
            raise NoReadyEndpoints(f"no ready endpoint for model {request.model or self.model_name}")
        target = candidates[next(self._counter) % len(candidates)]
        self.metrics.picks.labels(self.service, "round-robin", target.address).inc()
        self._e2e.observe(time.perf_counter() - started)
        return SchedulingResult(target=target, primary_profile="round-robin")

    def saturated(self) -> bool:
        """Return True only when no endpoint is ready: round robin has no saturation signal."""
        return not self.datastore.candidates()

    def request_finished(self, address: str, request_id: str = "") -> None:
        """Do nothing: round robin keeps no per-request state."""

    def close(self) -> None:
        """Do nothing: round robin runs no background work."""
