"""Health probes of a replica, read from a container's Kubernetes probe fields."""

from __future__ import annotations

from dataclasses import dataclass


class ProbeSpecError(ValueError):
    """A probe the local runtime cannot run (for example an `exec` probe)."""


@dataclass(frozen=True)
class Probe:
    """One probe with Kubernetes semantics; times are seconds.

    `kind` is "http" (GET `path`, healthy on 2xx/3xx) or "tcp" (healthy when the port
    accepts a connection). The local runtime always probes the replica's own port because
    each replica serves exactly one port; `declared_port` is kept for `describe`.
    """

    kind: str = "http"
    path: str = "/health"
    scheme: str = "HTTP"
    declared_port: int | str | None = None
    initial_delay_s: float = 0.0
    period_s: float = 1.0
    timeout_s: float = 5.0
    success_threshold: int = 1
    failure_threshold: int = 3

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "Probe":
        return cls(**data)


# Readiness gates routing: poll often so a replica joins the gateway soon after loading.
DEFAULT_READINESS = Probe(period_s=1.0, timeout_s=5.0, failure_threshold=3)

# Liveness restarts a hung replica. Without an explicit probe it starts counting only after
# the replica was ready once, so a slow model load is never mistaken for a hang.
DEFAULT_LIVENESS = Probe(period_s=10.0, timeout_s=10.0, failure_threshold=3)

# Without a startupProbe, a replica gets this long to become ready before it is restarted:
# loading a model on a few busy CPU cores can take minutes, a simulator only seconds.
DEFAULT_STARTUP_TIMEOUT_S = {"builtin": 1800.0, "vllm": 1800.0, "sim": 120.0}


def parse_probe(field: dict | None, path: str, default: Probe) -> Probe:
    """Build a Probe from a Kubernetes probe dict (`httpGet`, `tcpSocket`, timings).

    Missing timings take Kubernetes' defaults when the probe is given, and `default`
    when the field is absent. Raises ProbeSpecError for `exec` and `grpc` probes, naming
    `path`.
    """
    if not field:
        return default
    if "exec" in field or "grpc" in field:
        kind = "exec" if "exec" in field else "grpc"
        raise ProbeSpecError(f"{path}.{kind}: {kind} probes are not supported locally, use httpGet or tcpSocket")
    timings = dict(
        initial_delay_s=float(field.get("initialDelaySeconds", 0)),
        period_s=float(field.get("periodSeconds", 10)),
        timeout_s=float(field.get("timeoutSeconds", 1)),
        success_threshold=int(field.get("successThreshold", 1)),
        failure_threshold=int(field.get("failureThreshold", 3)),
    )
    if "httpGet" in field:
        http_get = field["httpGet"] or {}
        return Probe(
            kind="http",
            path=http_get.get("path", "/") or "/",
            scheme=str(http_get.get("scheme", "HTTP")).upper(),
            declared_port=http_get.get("port"),
            **timings,
        )
    if "tcpSocket" in field:
        return Probe(kind="tcp", path="", declared_port=(field["tcpSocket"] or {}).get("port"), **timings)
    raise ProbeSpecError(f"{path}: a probe needs httpGet or tcpSocket")
