"""Property: any YAML input yields valid resources or a SpecError with paths, nothing else."""

import copy
import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spec_factory import EXAMPLES, SHAPE_FILES

from llmisvc.api import SpecError, load_documents, resolve

# Raise LLMISVC_HYPOTHESIS_EXAMPLES for a longer search; the default keeps the suite quick.
EXAMPLES_PER_TEST = int(os.environ.get("LLMISVC_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES_PER_TEST, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True), st.text(max_size=30),
    st.sampled_from(["hf://a/b", "s3://x", "500m", "4Gi", "1e99999", "{{ .Nope }}", "main", "--config-text"]),
)
keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["spec", "model", "uri", "name", "replicas", "prefill", "router", "scheduler", "route",
                     "template", "containers", "args", "env", "ports", "containerPort", "parallelism",
                     "data", "dataLocal", "pool", "ref", "scaling", "baseRefs", "metadata", "labels"]),
)
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)), max_leaves=25)

EXAMPLE_DOCS = [yaml.safe_load((EXAMPLES / name).read_text()) for name in SHAPE_FILES]


def _check(text: str) -> None:
    try:
        resources = load_documents(text)
    except SpecError as exc:
        assert exc.errors
        assert all(isinstance(e.path, str) and e.path for e in exc.errors)
        assert all(e.reason for e in exc.errors)
        return
    configs = {r.name: r for r in resources if r.kind == "LLMInferenceServiceConfig"}
    for resource in resources:
        if resource.kind != "LLMInferenceService":
            continue
        try:
            resolved = resolve(resource, configs)
        except SpecError as exc:
            assert all(e.path for e in exc.errors)
            continue
        assert resolved.model_uri
        assert resolved.shape in ("scheduler", "no-scheduler", "pd")


@SETTINGS
@given(st.text(max_size=200))
def test_random_text(text):
    _check(text)


@SETTINGS
@given(values)
def test_random_documents(document):
    _check(yaml.safe_dump(document))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _paths(child, prefix + (index,))


@st.composite
def mutated_examples(draw):
    document = copy.deepcopy(draw(st.sampled_from(EXAMPLE_DOCS)))
    if draw(st.booleans()):
        document["apiVersion"] = "serving.kserve.io/v1alpha2"
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = [p for p in _paths(document) if p]
        path = draw(st.sampled_from(paths))
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        else:
            parent.append(draw(values))
    return document


@SETTINGS
@given(mutated_examples())
def test_mutated_examples(document):
    _check(yaml.safe_dump(document))


@st.composite
def services_with_base_refs(draw):
    service = draw(mutated_examples())
    base_spec = draw(st.one_of(
        st.dictionaries(keys, values, max_size=4),
        st.sampled_from([copy.deepcopy(d["spec"]) for d in EXAMPLE_DOCS]),
    ))
    config = {
        "apiVersion": "serving.kserve.io/v1alpha2",
        "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": "base"},
        "spec": base_spec,
    }
    if isinstance(service.get("spec"), dict):
        service["spec"]["baseRefs"] = [{"name": "base"}]
    return [config, service]


@SETTINGS
@given(services_with_base_refs())
def test_services_with_base_refs(documents):
    _check(yaml.safe_dump_all(documents))
