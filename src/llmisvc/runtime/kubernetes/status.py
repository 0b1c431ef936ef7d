"""Status conditions of an LLMInferenceService from the objects the operator observes.

Condition types, reasons and messages follow KServe's controller (v0.20):
- a workload condition is True when its Deployment (or LeaderWorkerSet) reports
  `Available=True`. Otherwise it is False with that condition's reason and message, or with
  reason `Progressing` while the object reports no `Available` condition yet;
- `HTTPRoutesReady` is False with reason `HTTPRoutesNotReady` until every parent of the
  managed route reports `Accepted=True`;
- `GatewaysReady` is False with reason `GatewaysNotReady` until every referenced Gateway
  reports `Programmed=True`;
- `WorkloadsReady` and `RouterReady` take the first False sub-condition's reason and
  message; `Ready` takes theirs;
- with the stop annotation every condition is False with reason `Stopped`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

WORKLOAD_SUBCONDITIONS = ("MainWorkloadReady", "WorkerWorkloadReady", "PrefillWorkloadReady",
                          "PrefillWorkerWorkloadReady")
ROUTER_SUBCONDITIONS = ("GatewaysReady", "HTTPRoutesReady", "InferencePoolReady",
                        "SchedulerWorkloadReady")
STOPPED_MESSAGE = "Service is stopped"


@dataclass(frozen=True)
class Condition:
    """One observed condition: `status` is "True" or "False"."""

    type: str
    status: str
    reason: str = ""
    message: str = ""


def ready(condition_type: str) -> Condition:
    """Return a True condition of `condition_type`."""
    return Condition(condition_type, "True")


def workload_condition(condition_type: str, workload: dict | None) -> Condition:
    """Return `condition_type` from a Deployment's or LeaderWorkerSet's `Available` condition."""
    for condition in ((workload or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Available":
            if condition.get("status") == "True":
                return ready(condition_type)
            return Condition(condition_type, "False", condition.get("reason", ""),
                             condition.get("message", ""))
    return Condition(condition_type, "False", "Progressing", "")


def _condition(parent_conditions: list[dict], wanted: str) -> dict | None:
    return next((c for c in parent_conditions if c.get("type") == wanted), None)


def route_condition(routes: list[tuple[str, str, dict | None]]) -> Condition:
    """Return `HTTPRoutesReady` from the per-parent `Accepted` conditions of `routes`, given
    as (namespace, name, route or None when it was not found)."""
    problems = []
    for namespace, name, route in routes:
        parents = ((route or {}).get("status") or {}).get("parents") or []
        if route is None:
            problems.append(f"{namespace}/{name}: not found")
        elif not parents:
            problems.append(f"{namespace}/{name}: no parent has accepted the route yet")
        for parent in parents:
            accepted = _condition(parent.get("conditions") or [], "Accepted")
            if accepted is None or accepted.get("status") != "True":
                accepted = accepted or {}
                problems.append(
                    f"{namespace}/{name}: Accepted={accepted.get('status', 'Unknown')} "
                    f"(reason {accepted.get('reason', '')!r}, message {accepted.get('message', '')!r})"
                )
    if problems:
        return Condition("HTTPRoutesReady", "False", "HTTPRoutesNotReady",
                         f"The following HTTPRoutes are not ready: [{', '.join(problems)}]")
    return ready("HTTPRoutesReady")


def gateways_condition(gateways: dict[tuple[str, str], dict | None]) -> Condition:
    """Return `GatewaysReady` from each Gateway's `Programmed` condition; a missing Gateway
    counts as not ready."""
    not_ready = []
    for (namespace, name), gateway in sorted(gateways.items()):
        conditions = ((gateway or {}).get("status") or {}).get("conditions") or []
        programmed = next((c for c in conditions if c.get("type") == "Programmed"), None)
        if programmed is None or programmed.get("status") != "True":
            not_ready.append(f"{namespace}/{name}")
    if not_ready:
        return Condition("GatewaysReady", "False", "GatewaysNotReady",
                         f"The following Gateways are not ready: [{' '.join(not_ready)}]")
    return ready("GatewaysReady")


def gateway_url(gateways: dict[tuple[str, str], dict | None], path: str,
                hostnames: list[str] | None = None) -> tuple[str | None, list[dict]]:
    """Return (url, addresses) for `path`: on the route's hostnames when it has any, else on
    the first address of each Gateway."""
    urls = [f"http://{hostname}{path}" for hostname in hostnames or [] if "*" not in hostname]
    for _, gateway in sorted(gateways.items()):
        for address in ((gateway or {}).get("status") or {}).get("addresses") or []:
            if address.get("value"):
                urls.append(f"http://{address['value']}{path}")
                break
    return (urls[0] if urls else None), [{"url": url} for url in urls]


def _aggregate(condition_type: str, parts: list[Condition]) -> Condition:
    for part in parts:
        if part.status == "False":
            return Condition(condition_type, "False", part.reason, part.message)
    return ready(condition_type)


def aggregate(observed: list[Condition]) -> list[Condition]:
    """Return `observed` plus WorkloadsReady, RouterReady and Ready derived from it."""
    by_type = {c.type: c for c in observed}
    workloads = _aggregate("WorkloadsReady", [by_type[t] for t in WORKLOAD_SUBCONDITIONS if t in by_type])
    router = _aggregate("RouterReady", [by_type[t] for t in ROUTER_SUBCONDITIONS if t in by_type])
    overall = _aggregate("Ready", [workloads, router])
    return list(observed) + [workloads, router, overall]


def stopped(condition_types: list[str]) -> list[Condition]:
    """Return every condition of `condition_types` plus the aggregates as Stopped."""
    types = list(condition_types) + ["WorkloadsReady", "RouterReady", "Ready"]
    return [Condition(t, "False", "Stopped", STOPPED_MESSAGE) for t in types]


def to_status_conditions(conditions: list[Condition], previous: list[dict],
                         now: datetime | None = None) -> list[dict]:
    """Return status condition dicts, keeping `lastTransitionTime` of unchanged statuses."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    old = {c.get("type"): c for c in previous or []}
    result = []
    for condition in conditions:
        before = old.get(condition.type) or {}
        transition = before.get("lastTransitionTime") if before.get("status") == condition.status else None
        entry = {
            "type": condition.type,
            "status": condition.status,
            "lastTransitionTime": transition or stamp,
        }
        if condition.reason:
            entry["reason"] = condition.reason
        if condition.message:
            entry["message"] = condition.message
        result.append(entry)
    return result
