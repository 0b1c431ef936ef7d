"""The operator (`llmisvc operator`, a real process) against the in-memory API server double.

Covered: create, update (scale and template change), a shape change that deletes children
the spec no longer needs, the stop annotation, delete with finalizer, and status from
Deployment, HTTPRoute and Gateway conditions. A watch reconnect during which a child is
deleted without a DELETED event is covered too.

Not covered without a real cluster: pods actually starting, because no controllers run and
the tests write Deployment, HTTPRoute and Gateway status themselves. Also not covered:
admission and schema validation by the API server, server-side apply field-manager
conflicts, RBAC of the operator's service account, and garbage collection timing.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml
from apiserver import ApiServer

from support import start, stop

HERE = Path(__file__).parent
SERVICE_API = "serving.kserve.io/v1alpha2"
SERVICE = "LLMInferenceService"
NAMESPACE = "llm"
WAIT_SECONDS = 60


def sample(name: str, new_name: str) -> dict:
    doc = yaml.safe_load((HERE / "samples" / f"{name}.yaml").read_text())
    doc["apiVersion"] = SERVICE_API
    doc["metadata"] = {"name": new_name, "namespace": NAMESPACE}
    return doc


def wait_for(check, what: str, timeout: float = WAIT_SECONDS):
    """Poll `check()` until it returns a truthy value; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The API server double with a programmed Gateway, and one operator process."""
    server = ApiServer()
    server.start()
    home = tmp_path_factory.mktemp("operator")
    kubeconfig = home / "kubeconfig"
    server.kubeconfig(kubeconfig)
    server.create({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "kserve-ingress-gateway", "namespace": "kserve"},
                   "spec": {"gatewayClassName": "test",
                            "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}})
    # The periodic resync is pushed far out so that every change the tests see comes from
    # watch events and re-lists, not from the timer.
    process = start(
        ["--log-level", "DEBUG", "operator", "--system-namespace", "llmisvc-system",
         "--resync-seconds", "3600", "--watch-timeout", "30"],
        home / "operator.log",
        env={"KUBECONFIG": str(kubeconfig), "HOME": str(home)},
    )
    try:
        wait_for(lambda: server.watch_count() >= 3 or process.poll() is not None,
                 "the operator to start watching")
        assert process.poll() is None, (home / "operator.log").read_text()[-4000:]
        yield server
    finally:
        stop(process)
        server.stop()
        log = (home / "operator.log").read_text()
        print(log[-8000:])


def deployment(server, name):
    return server.get("apps/v1", "Deployment", NAMESPACE, name)


def condition(server, service: str, condition_type: str) -> dict | None:
    obj = server.get(SERVICE_API, SERVICE, NAMESPACE, service) or {}
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == condition_type), None)


def make_available(server, name: str, available: bool = True, reason: str = "MinimumReplicasAvailable",
                   message: str = "Deployment has minimum availability.") -> None:
    server.set_status("apps/v1", "Deployment", NAMESPACE, name, {"conditions": [{
        "type": "Available", "status": "True" if available else "False",
        "reason": reason, "message": message}]})


def accept_route(server, name: str) -> None:
    server.set_status("gateway.networking.k8s.io/v1", "HTTPRoute", NAMESPACE, name, {"parents": [{
        "parentRef": {"name": "kserve-ingress-gateway", "namespace": "kserve"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""}]}]})


def program_gateway(server, programmed: bool) -> None:
    server.set_status("gateway.networking.k8s.io/v1", "Gateway", "kserve", "kserve-ingress-gateway", {
        "addresses": [{"type": "IPAddress", "value": "203.0.113.10"}],
        "conditions": [{"type": "Programmed", "status": "True" if programmed else "False",
                        "reason": "Programmed" if programmed else "AddressNotAssigned", "message": ""}]})


def test_create_applies_children_with_finalizer(cluster):
    server = cluster
    server.create(sample("scheduler", "create-a"))

    main = wait_for(lambda: deployment(server, "create-a-kserve"), "the main Deployment")
    wait_for(lambda: deployment(server, "create-a-kserve-router-scheduler"), "the scheduler Deployment")
    service = server.get(SERVICE_API, SERVICE, NAMESPACE, "create-a")
    assert main["metadata"]["ownerReferences"][0]["uid"] == service["metadata"]["uid"]
    assert main["spec"]["replicas"] == 2
    assert "serving.kserve.io/llmisvc-finalizer" in service["metadata"]["finalizers"]
    for kind, api, name in [("Service", "v1", "create-a-kserve-workload-svc"),
                            ("Service", "v1", "create-a-epp-service"),
                            ("HTTPRoute", "gateway.networking.k8s.io/v1", "create-a-kserve-route"),
                            ("InferencePool", "inference.networking.k8s.io/v1", "create-a-inference-pool")]:
        assert wait_for(lambda: server.get(api, kind, NAMESPACE, name), f"{kind} {name}")


def test_status_follows_observed_conditions(cluster):
    server = cluster
    server.create(sample("scheduler", "status-a"))
    wait_for(lambda: deployment(server, "status-a-kserve"), "the main Deployment")

    progressing = wait_for(lambda: condition(server, "status-a", "MainWorkloadReady"),
                           "MainWorkloadReady")
    assert progressing["status"] == "False"
    assert progressing["reason"] == "Progressing"

    make_available(server, "status-a-kserve", False, "MinimumReplicasUnavailable",
                   "Deployment does not have minimum availability.")
    unavailable = wait_for(
        lambda: (c := condition(server, "status-a", "MainWorkloadReady")) and
        c.get("reason") == "MinimumReplicasUnavailable" and c, "MinimumReplicasUnavailable")
    assert unavailable["message"] == "Deployment does not have minimum availability."
    ready = condition(server, "status-a", "Ready")
    assert ready["status"] == "False"

    make_available(server, "status-a-kserve")
    make_available(server, "status-a-kserve-router-scheduler")
    program_gateway(server, False)
    gateways = wait_for(lambda: (c := condition(server, "status-a", "GatewaysReady")) and
                        c["reason"] == "GatewaysNotReady" and c, "GatewaysNotReady")
    assert "kserve/kserve-ingress-gateway" in gateways["message"]
    route = condition(server, "status-a", "HTTPRoutesReady")
    assert route["status"] == "False"
    assert route["reason"] == "HTTPRoutesNotReady"

    program_gateway(server, True)
    accept_route(server, "status-a-kserve-route")
    wait_for(lambda: (c := condition(server, "status-a", "Ready")) and c["status"] == "True",
             "Ready=True")
    status = server.get(SERVICE_API, SERVICE, NAMESPACE, "status-a")["status"]
    assert status["url"] == "http://203.0.113.10/llm/status-a"
    for condition_type in ("WorkloadsReady", "RouterReady", "MainWorkloadReady",
                           "SchedulerWorkloadReady", "HTTPRoutesReady", "GatewaysReady"):
        assert condition(server, "status-a", condition_type)["status"] == "True", condition_type


def test_update_scales_and_changes_template(cluster):
    server = cluster
    server.create(sample("no-scheduler", "update-a"))
    wait_for(lambda: deployment(server, "update-a-kserve"), "the main Deployment")

    server.patch(SERVICE_API, SERVICE, NAMESPACE, "update-a", {"spec": {"replicas": 5}})
    wait_for(lambda: deployment(server, "update-a-kserve")["spec"]["replicas"] == 5, "5 replicas")

    spec = server.get(SERVICE_API, SERVICE, NAMESPACE, "update-a")["spec"]
    template = copy.deepcopy(spec["template"])
    template["containers"][0]["env"].append({"name": "EXTRA_FLAG", "value": "on"})
    server.patch(SERVICE_API, SERVICE, NAMESPACE, "update-a", {"spec": {"template": template}})

    def env_names():
        pod = deployment(server, "update-a-kserve")["spec"]["template"]["spec"]
        main = next(c for c in pod["containers"] if c["name"] == "main")
        return "EXTRA_FLAG" in [e["name"] for e in main.get("env") or []]

    wait_for(env_names, "the new env var in the pod template")


def test_shape_change_deletes_unneeded_children(cluster):
    server = cluster
    server.create(sample("scheduler", "shape-a"))
    wait_for(lambda: deployment(server, "shape-a-kserve-router-scheduler"), "the scheduler")

    server.patch(SERVICE_API, SERVICE, NAMESPACE, "shape-a", {"spec": {"router": {"scheduler": None}}})
    wait_for(lambda: deployment(server, "shape-a-kserve-router-scheduler") is None,
             "the scheduler Deployment to be deleted")
    wait_for(lambda: server.get("inference.networking.k8s.io/v1", "InferencePool", NAMESPACE,
                                "shape-a-inference-pool") is None, "the InferencePool to be deleted")
    route = server.get("gateway.networking.k8s.io/v1", "HTTPRoute", NAMESPACE, "shape-a-kserve-route")
    backends = [b["name"] for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == ["shape-a-kserve-workload-svc"]
    assert deployment(server, "shape-a-kserve") is not None


def test_stop_annotation_deletes_workloads(cluster):
    server = cluster
    server.create(sample("pd", "stop-a"))
    wait_for(lambda: deployment(server, "stop-a-kserve-prefill"), "the prefill Deployment")

    server.patch(SERVICE_API, SERVICE, NAMESPACE, "stop-a",
                 {"metadata": {"annotations": {"serving.kserve.io/stop": "true"}}})
    wait_for(lambda: deployment(server, "stop-a-kserve") is None, "the decode Deployment to go")
    wait_for(lambda: deployment(server, "stop-a-kserve-prefill") is None, "the prefill Deployment to go")
    ready = wait_for(lambda: (c := condition(server, "stop-a", "Ready")) and c["reason"] == "Stopped" and c,
                     "Ready reason Stopped")
    assert ready["status"] == "False"
    assert condition(server, "stop-a", "PrefillWorkloadReady")["reason"] == "Stopped"

    server.patch(SERVICE_API, SERVICE, NAMESPACE, "stop-a",
                 {"metadata": {"annotations": {"serving.kserve.io/stop": None}}})
    wait_for(lambda: deployment(server, "stop-a-kserve"), "the decode Deployment to return")


def test_delete_runs_finalizer(cluster):
    server = cluster
    server.create(sample("pd", "delete-a"))
    wait_for(lambda: server.get("rbac.authorization.k8s.io/v1", "Role", NAMESPACE, "delete-a-kserve-role"),
             "the sidecar Role")

    server.delete(SERVICE_API, SERVICE, NAMESPACE, "delete-a")
    wait_for(lambda: server.get(SERVICE_API, SERVICE, NAMESPACE, "delete-a") is None,
             "the service to be released by its finalizer")
    assert server.list("apps/v1", "Deployment", NAMESPACE, "app.kubernetes.io/name=delete-a") == []
    assert server.list("rbac.authorization.k8s.io/v1", "Role", NAMESPACE,
                       "app.kubernetes.io/name=delete-a") == []
    assert server.list("v1", "Service", NAMESPACE, "app.kubernetes.io/name=delete-a") == []


def test_reconnect_relists_missed_delete(cluster):
    server = cluster
    server.create(sample("no-scheduler", "relist-a"))
    first = wait_for(lambda: deployment(server, "relist-a-kserve"), "the main Deployment")

    # The Deployment disappears and its DELETED event is lost, then every watch reconnects.
    server.delete("apps/v1", "Deployment", NAMESPACE, "relist-a-kserve", silent=True)
    server.close_watches()

    again = wait_for(lambda: deployment(server, "relist-a-kserve"),
                     "the Deployment to be re-created after the re-list")
    assert again["metadata"]["uid"] != first["metadata"]["uid"]


def test_config_change_reconciles_services(cluster):
    server = cluster
    doc = sample("no-scheduler", "config-a")
    doc["spec"]["baseRefs"] = [{"name": "team-defaults"}]
    server.create(doc)

    invalid = wait_for(lambda: (c := condition(server, "config-a", "Ready")) and
                       c.get("reason") == "InvalidSpec" and c, "Ready reason InvalidSpec")
    assert "team-defaults" in invalid["message"]
    assert deployment(server, "config-a-kserve") is None

    # The config arrives in the system namespace; its event reconciles every service.
    server.create({
        "apiVersion": SERVICE_API, "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": "team-defaults", "namespace": "llmisvc-system"},
        "spec": {"template": {"containers": [{"name": "main", "env": [{"name": "TEAM", "value": "a"}]}]}},
    })

    def team_env():
        current = deployment(server, "config-a-kserve")
        if current is None:
            return None
        main = next(c for c in current["spec"]["template"]["spec"]["containers"] if c["name"] == "main")
        return {e["name"]: e.get("value") for e in main.get("env") or []}.get("TEAM")

    assert wait_for(team_env, "the Deployment with the config's env") == "a"

    server.patch(SERVICE_API, "LLMInferenceServiceConfig", "llmisvc-system", "team-defaults",
                 {"spec": {"template": {"containers": [{"name": "main", "env": [{"name": "TEAM", "value": "b"}]}]}}})
    assert wait_for(lambda: team_env() == "b", "the config change to reach the Deployment")


def test_missing_crd_reported_in_status(cluster):
    server = cluster
    # The double serves no LeaderWorkerSet kind, as a cluster without its controller.
    server.create(sample("dp-worker", "lws-a"))

    ready = wait_for(lambda: (c := condition(server, "lws-a", "Ready")) and
                     c.get("reason") == "ReconcileError" and c, "Ready reason ReconcileError")
    assert "LeaderWorkerSet llm/lws-a-kserve-mn" in ready["message"]
    assert "404" in ready["message"]


def test_v1alpha1_object_served_as_v1alpha2(cluster):
    server = cluster
    doc = sample("no-scheduler", "alpha1-a")
    doc["apiVersion"] = "serving.kserve.io/v1alpha1"
    doc["spec"]["model"]["criticality"] = "Critical"
    server.create(doc)

    # The double, like an API server without a conversion webhook, returns the object
    # unchanged under v1alpha2, the version the operator reads.
    wait_for(lambda: deployment(server, "alpha1-a-kserve"), "the main Deployment")
    assert condition(server, "alpha1-a", "PresetsCombined") is None


def test_referenced_route_status(cluster):
    server = cluster
    server.create({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                   "metadata": {"name": "team-route", "namespace": NAMESPACE},
                   "spec": {"parentRefs": [{"name": "kserve-ingress-gateway", "namespace": "kserve"}],
                            "rules": [{"backendRefs": [{"name": "refs-a-kserve-workload-svc", "port": 8000}]}]}})
    doc = sample("no-scheduler", "refs-a")
    doc["spec"]["router"] = {"route": {"http": {"refs": [{"name": "team-route"}]}}}
    server.create(doc)

    wait_for(lambda: deployment(server, "refs-a-kserve"), "the main Deployment")
    assert server.get("gateway.networking.k8s.io/v1", "HTTPRoute", NAMESPACE, "refs-a-kserve-route") is None
    route = wait_for(lambda: condition(server, "refs-a", "HTTPRoutesReady"), "HTTPRoutesReady")
    assert route["status"] == "False"
    assert "llm/team-route" in route["message"]

    accept_route(server, "team-route")
    program_gateway(server, True)
    make_available(server, "refs-a-kserve")
    # Status follows the Deployment change, which also re-reads the referenced route.
    wait_for(lambda: (c := condition(server, "refs-a", "Ready")) and c["status"] == "True", "Ready=True")
