"""Loading and validating LLMInferenceService documents."""

import copy

import pytest

from spec_factory import MODEL_URI, SHAPE_FILES, config, dump, minimal_service

from llmisvc.api import Resource, SpecError, load_documents, load_file, resolve
from support import REPO


@pytest.mark.parametrize("version", ["v1alpha1", "v1alpha2"])
@pytest.mark.parametrize("name", SHAPE_FILES)
def test_example_shapes_load(example_text, name, version):
    (resource,) = load_documents(example_text(name, version))
    assert resource.kind == "LLMInferenceService"
    assert resource.api_version == f"serving.kserve.io/{version}"
    assert resource.namespace == "default"
    assert resource.spec["model"]["uri"] == MODEL_URI


def test_load_file_reads_path():
    (resource,) = load_file(REPO / "examples" / "default-scheduler.yaml")
    assert resource.name == "smollm2"
    assert isinstance(resource, Resource)


def test_model_name_defaults_to_metadata_name():
    (resource,) = load_documents(dump(minimal_service(name="my-model")))
    assert "name" not in resource.spec["model"]
    assert resolve(resource).model_name == "my-model"


def test_namespace_from_metadata():
    doc = minimal_service()
    doc["metadata"]["namespace"] = "team-a"
    (resource,) = load_documents(dump(doc))
    assert resource.namespace == "team-a"


def test_multiple_documents_in_order():
    text = dump(config("base", replicas=2), minimal_service(name="a"), minimal_service(name="b"))
    resources = load_documents(text)
    assert [(r.kind, r.name) for r in resources] == [
        ("LLMInferenceServiceConfig", "base"), ("LLMInferenceService", "a"), ("LLMInferenceService", "b"),
    ]


def test_null_fields_are_absent():
    text = dump(minimal_service(replicas=None, router={"scheduler": None, "route": {}}))
    (resource,) = load_documents(text)
    assert "replicas" not in resource.spec
    assert resource.spec["router"] == {"route": {}}


def test_timestamps_stay_strings():
    doc = minimal_service()
    text = dump(doc).replace("metadata:\n", "metadata:\n  creationTimestamp: 2025-01-01T00:00:00Z\n")
    (resource,) = load_documents(text)
    assert resource.obj["metadata"]["creationTimestamp"] == "2025-01-01T00:00:00Z"


def test_errors_name_document_in_multi_document_stream():
    text = dump(minimal_service(name="ok"), minimal_service(name="bad", replicas=-1))
    with pytest.raises(SpecError) as info:
        load_documents(text)
    assert str(info.value) == "document 2: spec.replicas: must be >= 0, got -1"


def test_all_errors_reported_together():
    doc = minimal_service(replicsa=3, prefill={"replicas": -1})
    with pytest.raises(SpecError) as info:
        load_documents(dump(doc))
    paths = [e.path for e in info.value.errors]
    assert paths == ["spec.replicsa", "spec.prefill.replicas"]


def test_unknown_field_suggests_nearest():
    with pytest.raises(SpecError) as info:
        load_documents(dump(minimal_service(replicsa=3)))
    assert str(info.value) == "spec.replicsa: unknown field 'replicsa'; did you mean 'replicas'?"


def test_negative_prefill_replicas_message():
    with pytest.raises(SpecError) as info:
        load_documents(dump(minimal_service(prefill={"replicas": -1})))
    assert str(info.value) == "spec.prefill.replicas: must be >= 0, got -1"


def test_yaml_syntax_error_has_line():
    with pytest.raises(SpecError) as info:
        load_documents("apiVersion: serving.kserve.io/v1alpha2\nkind: [unclosed\n")
    assert info.value.errors[0].path == "(document)"
    assert "line" in info.value.errors[0].reason


def test_empty_stream_rejected():
    with pytest.raises(SpecError) as info:
        load_documents("---\n")
    assert "no documents" in str(info.value)


def test_scheme_helpers():
    from llmisvc.api import needs_cluster_storage, uri_scheme

    assert uri_scheme("hf://org/name") == "hf"
    assert uri_scheme("/models/x.gguf") == "file"
    assert needs_cluster_storage("s3://bucket/model")
    assert needs_cluster_storage("oci://registry/model:1")
    assert not needs_cluster_storage("pvc://claim/model")


def _with(path: str, value, base: dict | None = None) -> dict:
    """Return the minimal service with `value` set at dotted `path` (lists as [i])."""
    doc = copy.deepcopy(base or minimal_service())
    parts = path.split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return doc


MAIN = {"name": "main"}
INVALID = [
    # (case id, document, expected path, expected text in the reason)
    ("unknown top-level spec field", _with("spec.replicsa", 3), "spec.replicsa", "did you mean 'replicas'"),
    ("negative replicas", _with("spec.replicas", -1), "spec.replicas", "must be >= 0, got -1"),
    ("negative prefill replicas", _with("spec.prefill", {"replicas": -1}), "spec.prefill.replicas", ">= 0"),
    ("replicas as string", _with("spec.replicas", "3"), "spec.replicas", "must be integer, got string"),
    ("replicas as boolean", _with("spec.replicas", True), "spec.replicas", "must be integer, got boolean"),
    ("replicas as float", _with("spec.replicas", 1.5), "spec.replicas", "must be integer, got number"),
    ("model not an object", _with("spec.model", "hf://x/y"), "spec.model", "must be object"),
    ("model uri missing", _with("spec.model", {"name": "x"}), "spec.model.uri", "required"),
    ("model name wrong type", _with("spec.model.name", 7), "spec.model.name", "must be string"),
    ("model uri scheme", _with("spec.model.uri", "ftp://host/model"), "spec.model.uri", "unsupported URI scheme 'ftp'"),
    ("model uri http", _with("spec.model.uri", "https://host/m"), "spec.model.uri", "unsupported URI scheme"),
    ("model uri empty hf", _with("spec.model.uri", "hf://"), "spec.model.uri", "names no repository"),
    ("criticality in v1alpha2", _with("spec.model.criticality", "Critical"), "spec.model.criticality", "unknown field"),
    ("criticality enum v1alpha1", _with("spec.model.criticality", "Urgent", minimal_service("v1alpha1")),
     "spec.model.criticality", "must be one of Critical, Standard, Sheddable"),
    ("tensor zero", _with("spec.parallelism", {"tensor": 0}), "spec.parallelism.tensor", "must be >= 1, got 0"),
    ("dataLocal above data", _with("spec.parallelism", {"data": 2, "dataLocal": 4}),
     "spec.parallelism.dataLocal", "must be <= parallelism.data (2), got 4"),
    ("dataLocal not dividing data", _with("spec.parallelism", {"data": 6, "dataLocal": 4}),
     "spec.parallelism.dataLocal", "divide"),
    ("prefill dataLocal above data", _with("spec.prefill", {"parallelism": {"data": 1, "dataLocal": 2}}),
     "spec.prefill.parallelism.dataLocal", "must be <= parallelism.data"),
    ("dataRPCPort out of range", _with("spec.parallelism", {"dataRPCPort": 70000}),
     "spec.parallelism.dataRPCPort", "must be <= 65535"),
    ("scaling with replicas", _with("spec.scaling", {"maxReplicas": 3}, minimal_service(replicas=2)),
     "spec.scaling", "must not be set together with spec.replicas"),
    ("prefill scaling with replicas", _with("spec.prefill", {"replicas": 1, "scaling": {"maxReplicas": 2}}),
     "spec.prefill.scaling", "spec.prefill.replicas"),
    ("scaling min above max", _with("spec.scaling", {"minReplicas": 4, "maxReplicas": 2}),
     "spec.scaling.minReplicas", "must be <= maxReplicas"),
    ("scaling without maxReplicas", _with("spec.scaling", {"minReplicas": 1}), "spec.scaling.maxReplicas", "required"),
    ("pool spec and ref", _with("spec.router", {"scheduler": {"pool": {
        "ref": {"name": "p"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 8000}],
                 "endpointPickerRef": {"name": "epp"}}}}}),
     "spec.router.scheduler.pool", "either spec"),
    ("route spec and refs", _with("spec.router", {"route": {"http": {"refs": [{"name": "r"}], "spec": {}}}}),
     "spec.router.route.http", "either spec"),
    ("scheduler config inline and ref", _with("spec.router", {"scheduler": {"config": {
        "inline": {"plugins": []}, "ref": {"name": "cm", "key": "config.yaml"}}}}),
     "spec.router.scheduler.config", "either inline or ref"),
    ("container port too high", _with("spec.template", {"containers": [{"name": "main", "ports": [{"containerPort": 70000}]}]}),
     "spec.template.containers[0].ports[0].containerPort", "must be <= 65535, got 70000"),
    ("container port zero", _with("spec.template", {"containers": [{"name": "main", "ports": [{"containerPort": 0}]}]}),
     "spec.template.containers[0].ports[0].containerPort", "must be >= 1"),
    ("probe port out of range", _with("spec.template", {"containers": [{"name": "main", "readinessProbe": {
        "httpGet": {"path": "/health", "port": 99999}}}]}),
     "spec.template.containers[0].readinessProbe.httpGet.port", "between 1 and 65535"),
    ("probe named port invalid", _with("spec.template", {"containers": [{"name": "main", "livenessProbe": {
        "tcpSocket": {"port": "Not_A_Name"}}}]}),
     "spec.template.containers[0].livenessProbe.tcpSocket.port", "not a port number or port name"),
    ("probe two handlers", _with("spec.template", {"containers": [{"name": "main", "readinessProbe": {
        "httpGet": {"port": 8000}, "tcpSocket": {"port": 8000}}}]}),
     "spec.template.containers[0].readinessProbe", "one handler"),
    ("probe period zero", _with("spec.template", {"containers": [{"name": "main", "readinessProbe": {
        "httpGet": {"port": 8000}, "periodSeconds": 0}}]}),
     "spec.template.containers[0].readinessProbe.periodSeconds", ">= 1"),
    ("container without name", _with("spec.template", {"containers": [{"image": "x"}]}),
     "spec.template.containers[0].name", "required"),
    ("duplicate container names", _with("spec.template", {"containers": [MAIN, MAIN]}),
     "spec.template.containers[1].name", "duplicate name 'main' (also at index 0)"),
    ("container name in two lists", _with("spec.template", {"containers": [MAIN], "initContainers": [MAIN]}),
     "spec.template.initContainers[0].name", "duplicate container name 'main'"),
    ("duplicate env name", _with("spec.template", {"containers": [{"name": "main", "env": [
        {"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}]}),
     "spec.template.containers[0].env[1].name", "duplicate name 'A'"),
    ("duplicate port with default protocol", _with("spec.template", {"containers": [{"name": "main", "ports": [
        {"containerPort": 8000}, {"containerPort": 8000, "protocol": "TCP"}]}]}),
     "spec.template.containers[0].ports[1]", "duplicate containerPort 8000 protocol 'TCP'"),
    ("duplicate header to remove", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": ["x-a", "x-a"]}}]}]}}}}),
     "spec.router.route.http.spec.rules[0].filters[0].requestHeaderModifier.remove[1]", "duplicate value"),
    ("duplicate volume names", _with("spec.template", {"volumes": [{"name": "v", "emptyDir": {}},
                                                                    {"name": "v", "emptyDir": {}}]}),
     "spec.template.volumes[1].name", "duplicate name 'v'"),
    ("volume with two sources", _with("spec.template", {"volumes": [{"name": "v", "emptyDir": {},
                                                                     "hostPath": {"path": "/x"}}]}),
     "spec.template.volumes[0]", "one volume source"),
    ("env value and valueFrom", _with("spec.template", {"containers": [{"name": "main", "env": [
        {"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}),
     "spec.template.containers[0].env[0]", "either value or valueFrom"),
    ("env valueFrom unknown source", _with("spec.template", {"containers": [{"name": "main", "env": [
        {"name": "A", "valueFrom": {"fieldref": {"fieldPath": "metadata.name"}}}]}]}),
     "spec.template.containers[0].env[0].valueFrom.fieldref", "did you mean 'fieldRef'"),
    ("env value not a string", _with("spec.template", {"containers": [{"name": "main", "env": [
        {"name": "A", "value": 1}]}]}),
     "spec.template.containers[0].env[0].value", "must be string, got integer"),
    ("args not a list", _with("spec.template", {"containers": [{"name": "main", "args": "--x"}]}),
     "spec.template.containers[0].args", "must be list, got string"),
    ("invalid cpu quantity", _with("spec.template", {"containers": [{"name": "main", "resources": {
        "limits": {"cpu": "two"}}}]}),
     "spec.template.containers[0].resources.limits[cpu]", "invalid quantity"),
    ("request above limit", _with("spec.template", {"containers": [{"name": "main", "resources": {
        "requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}]}),
     "spec.template.containers[0].resources.requests[cpu]", "must be <= limits.cpu"),
    ("duplicate mountPath", _with("spec.template", {"containers": [{"name": "main", "volumeMounts": [
        {"name": "a", "mountPath": "/m"}, {"name": "b", "mountPath": "/m"}]}]}),
     "spec.template.containers[0].volumeMounts[1].mountPath", "duplicate mountPath"),
    ("affinity unknown field", _with("spec.template", {"affinity": {"nodeAfinity": {}}}),
     "spec.template.affinity.nodeAfinity", "did you mean 'nodeAffinity'"),
    ("toleration seconds wrong type", _with("spec.template", {"tolerations": [{"key": "k", "tolerationSeconds": "x"}]}),
     "spec.template.tolerations[0].tolerationSeconds", "must be integer"),
    ("worker container port", _with("spec.worker", {"containers": [{"name": "main", "ports": [{"containerPort": -5}]}]}),
     "spec.worker.containers[0].ports[0].containerPort", ">= 1"),
    ("scheduler template unknown", _with("spec.router", {"scheduler": {"template": {"containerz": []}}}),
     "spec.router.scheduler.template.containerz", "did you mean 'containers'"),
    ("route weight too high", _with("spec.router", {"route": {"weight": 2000000}}), "spec.router.route.weight", "<= 1000000"),
    ("httproute filter type enum", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"filters": [{"type": "Rewrite"}]}]}}}}),
     "spec.router.route.http.spec.rules[0].filters[0].type", "must be one of"),
    ("gateway refs not a list", _with("spec.router", {"gateway": {"refs": {"name": "g"}}}),
     "spec.router.gateway.refs", "must be list"),
    ("baseRef duplicate", _with("spec.baseRefs", [{"name": "a"}, {"name": "a"}]), "spec.baseRefs[1].name", "duplicate"),
    ("baseRef missing name", _with("spec.baseRefs", [{}]), "spec.baseRefs[0].name", "required"),
    ("labels value wrong type", _with("spec.labels", {"team": 5}), "spec.labels[team]", "must be string"),
    ("label value too long", _with("spec.labels", {"team": "x" * 64}), "spec.labels[team]", "invalid label value"),
    ("metadata name uppercase", _with("metadata.name", "MyModel"), "metadata.name", "DNS-1123 label"),
    ("metadata name underscore", _with("metadata.name", "my_model"), "metadata.name", "DNS-1123 label"),
    ("metadata name too long", _with("metadata.name", "a" * 64), "metadata.name", "at most 63"),
    ("metadata name missing", _with("metadata", {}), "metadata.name", "required"),
    ("annotation key invalid", _with("metadata.annotations", {"bad key": "x"}), "metadata.annotations[bad key]",
     "invalid annotation key"),
    ("label key prefix invalid", _with("spec.labels", {"Bad_Prefix/role": "x"}), "spec.labels[Bad_Prefix/role]",
     "invalid label key"),
    ("metadata namespace invalid", _with("metadata.namespace", "Team.A"), "metadata.namespace", "DNS-1123"),
    ("kvCacheOffloading eviction enum", _with("spec.kvCacheOffloading", {"cpu": "4Gi", "evictionPolicy": "fifo"}),
     "spec.kvCacheOffloading.evictionPolicy", "lru, arc"),
    ("kvCacheOffloading in v1alpha1", _with("spec.kvCacheOffloading", {"cpu": "4Gi"}, minimal_service("v1alpha1")),
     "spec.kvCacheOffloading", "unknown field"),
    ("lora maxRank zero", _with("spec.model.lora", {"maxRank": 0}), "spec.model.lora.maxRank", ">= 1"),
    ("storageInitializer wrong type", _with("spec.storageInitializer", {"enabled": "yes please"}),
     "spec.storageInitializer.enabled", "must be boolean"),
    ("tracing unknown field", _with("spec.tracing", {"endpoint": "x"}), "spec.tracing.endpoint", "unknown field"),
    ("route timeout format", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"timeouts": {"request": "10 seconds"}}]}}}}),
     "spec.router.route.http.spec.rules[0].timeouts.request", "must match"),
    ("route hostname format", _with("spec.router", {"route": {"http": {"spec": {"hostnames": ["Bad_Host"]}}}}),
     "spec.router.route.http.spec.hostnames[0]", "invalid value 'Bad_Host'"),
    ("route without rules", _with("spec.router", {"route": {"http": {"spec": {"rules": []}}}}),
     "spec.router.route.http.spec.rules", "at least 1 item"),
    ("route too many rules", _with("spec.router", {"route": {"http": {"spec": {"rules": [{}] * 17}}}}),
     "spec.router.route.http.spec.rules", "at most 16 items, got 17"),
    ("parentRef namespace format", _with("spec.router", {"route": {"http": {"spec": {"parentRefs": [
        {"name": "gw", "namespace": "Gateways"}]}}}}),
     "spec.router.route.http.spec.parentRefs[0].namespace", "must match"),
    ("backendRef empty name", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"backendRefs": [{"name": ""}]}]}}}}),
     "spec.router.route.http.spec.rules[0].backendRefs[0].name", "must not be empty"),
    ("pool without target ports", _with("spec.router", {"scheduler": {"pool": {"spec": {
        "selector": {"matchLabels": {"a": "b"}}, "targetPorts": [], "endpointPickerRef": {"name": "e"}}}}}),
     "spec.router.scheduler.pool.spec.targetPorts", "at least 1 item"),
    ("gateway ref namespace format", _with("spec.router", {"gateway": {"refs": [{"name": "g", "namespace": "A_B"}]}}),
     "spec.router.gateway.refs[0].namespace", "must match"),
    ("variantCost format", _with("spec.scaling", {"maxReplicas": 2, "wva": {"variantCost": "cheap"}}),
     "spec.scaling.wva.variantCost", "must match"),
    ("cpu as float", _with("spec.template", {"containers": [{"name": "main", "resources": {"limits": {"cpu": 0.5}}}]}),
     "spec.template.containers[0].resources.limits[cpu]", 'quantity string such as "500m"'),
    ("scaling without wva", _with("spec.scaling", {"maxReplicas": 2}), "spec.scaling.wva", "is required"),
    ("scaling hpa and keda", _with("spec.scaling", {"maxReplicas": 2, "wva": {"hpa": {}, "keda": {}}}),
     "spec.scaling.wva", "either hpa or keda"),
    ("keda idle not below min", _with("spec.scaling", {"minReplicas": 2, "maxReplicas": 4, "wva": {
        "keda": {"idleReplicaCount": 2}}}), "spec.scaling.wva.keda.idleReplicaCount", "must be < minReplicas (2)"),
    ("picker service without port", _with("spec.router", {"scheduler": {"pool": {"spec": {
        "selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 8000}], "endpointPickerRef": {"name": "e"}}}}}),
     "spec.router.scheduler.pool.spec.endpointPickerRef.port", "required when kind is Service"),
    ("duplicate target ports", _with("spec.router", {"scheduler": {"pool": {"spec": {
        "selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 8000}, {"number": 8000}],
        "endpointPickerRef": {"name": "e", "port": {"number": 9002}}}}}}),
     "spec.router.scheduler.pool.spec.targetPorts", "must be unique"),
    ("route backend service without port", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"backendRefs": [{"name": "svc"}]}]}}}}),
     "spec.router.route.http.spec.rules[0].backendRefs[0].port", "required for a Service reference"),
    ("route path not absolute", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "v1"}}]}]}}}}),
     "spec.router.route.http.spec.rules[0].matches[0].path.value", "absolute path"),
    ("route path double slash", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"matches": [{"path": {"value": "/a//b"}}]}]}}}}),
     "spec.router.route.http.spec.rules[0].matches[0].path.value", "must not contain '//'"),
    ("route filter field mismatch", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"filters": [{"type": "RequestHeaderModifier", "urlRewrite": {"hostname": "a"}}]}]}}}}),
     "spec.router.route.http.spec.rules[0].filters[0].urlRewrite", "must be unset unless type is URLRewrite"),
    ("route filter repeated", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"filters": [{"type": "CORS", "cors": {}}, {"type": "CORS", "cors": {}}]}]}}}}),
     "spec.router.route.http.spec.rules[0].filters", "CORS filter must not be repeated"),
    ("route redirect and rewrite", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"filters": [{"type": "RequestRedirect", "requestRedirect": {}}, {"type": "URLRewrite", "urlRewrite": {}}]}]}}}}),
     "spec.router.route.http.spec.rules[0].filters", "either a RequestRedirect or a URLRewrite"),
    ("route prefix rewrite needs one prefix match", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"matches": [{"path": {"type": "Exact", "value": "/a"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                                                     "replacePrefixMatch": "/"}}}]}]}}}}),
     "spec.router.route.http.spec.rules[0].matches", "exactly one match, of type PathPrefix"),
    ("route backend timeout above request", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"timeouts": {"request": "10s", "backendRequest": "1m"}}]}}}}),
     "spec.router.route.http.spec.rules[0].timeouts.backendRequest", "must not be longer than request"),
    ("route mirror fraction", _with("spec.router", {"route": {"http": {"spec": {"rules": [
        {"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "m", "port": 80},
                                                                  "fraction": {"numerator": 5, "denominator": 2}}}]}]}}}}),
     "spec.router.route.http.spec.rules[0].filters[0].requestMirror.fraction.numerator", "must be <= denominator"),
    ("wrong apiVersion", _with("apiVersion", "serving.kserve.io/v1beta1"), "apiVersion", "must be"),
    ("wrong kind", _with("kind", "InferenceService"), "kind", "must be LLMInferenceService"),
    ("spec not an object", _with("spec", ["a"]), "spec", "must be object, got list"),
    ("unknown top-level field", _with("specs", {}), "specs", "did you mean 'spec'"),
]


@pytest.mark.parametrize("case,document,path,reason", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_rejected_with_path(case, document, path, reason):
    with pytest.raises(SpecError) as info:
        load_documents(dump(document))
    matching = [e for e in info.value.errors if e.path == path]
    assert matching, f"no error at {path}: {info.value}"
    assert any(reason in e.reason for e in matching), str(info.value)


def test_invalid_table_is_large_enough():
    assert len(INVALID) >= 30


def test_kind_list_expanded():
    text = dump({"apiVersion": "v1", "kind": "List", "items": [minimal_service(name="a"), config("c")]})
    assert [(r.kind, r.name) for r in load_documents(text)] == [
        ("LLMInferenceService", "a"), ("LLMInferenceServiceConfig", "c"),
    ]


def test_kind_list_item_error_path():
    text = dump({"apiVersion": "v1", "kind": "List", "items": [minimal_service(name="a", replicas=-2)]})
    with pytest.raises(SpecError) as info:
        load_documents(text)
    assert str(info.value) == "items[0].spec.replicas: must be >= 0, got -2"


def test_duplicate_key_rejected():
    text = dump(minimal_service(replicas=1)) + "  replicas: 3\n"
    with pytest.raises(SpecError) as info:
        load_documents(text)
    reason = info.value.errors[0].reason
    assert "duplicate key 'replicas'" in reason
    assert "line" in reason


def test_yaml_merge_keys_allowed():
    text = """
defaults: &defaults
  uri: hf://HuggingFaceTB/SmolLM2-135M-Instruct
apiVersion: serving.kserve.io/v1alpha2
kind: LLMInferenceService
metadata: {name: merged}
spec:
  model:
    <<: *defaults
    name: merged-model
"""
    with pytest.raises(SpecError) as info:
        load_documents(text)
    assert [e.path for e in info.value.errors] == ["defaults"]


TEMPLATED_ROUTE = {"route": {"http": {"spec": {"rules": [
    {"matches": [{"path": {"type": "PathPrefix", "value": "/{{ .ObjectMeta.Name }}"}}]}]}}}}


def test_v1alpha2_config_may_template_route_paths():
    (resource,) = load_documents(dump(config("templated", router=TEMPLATED_ROUTE)))
    assert resource.kind == "LLMInferenceServiceConfig"


def test_service_route_paths_checked():
    with pytest.raises(SpecError) as info:
        load_documents(dump(minimal_service(router=TEMPLATED_ROUTE)))
    assert info.value.errors[0].path == "spec.router.route.http.spec.rules[0].matches[0].path.value"


def test_v1alpha1_config_route_paths_checked():
    with pytest.raises(SpecError):
        load_documents(dump(config("templated", version="v1alpha1", router=TEMPLATED_ROUTE)))
