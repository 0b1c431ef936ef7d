"""Field documentation in the layout of kubectl explain."""

import pytest

from llmisvc.api.explain import ExplainError, explain


def test_explain_top_level():
    text = explain("llmisvc")
    assert text.startswith("KIND:     LLMInferenceService\nVERSION:  serving.kserve.io/v1alpha2\n")
    assert "  spec\t<LLMInferenceServiceSpec>" in text


def test_explain_field_with_children():
    text = explain("llminferenceservice.spec.parallelism")
    assert "FIELD: parallelism <ParallelismSpec>" in text
    assert "  dataLocal\t<integer>" in text
    assert "Data-parallel ranks per pod" in text


def test_explain_steps_through_lists():
    text = explain("spec.template.containers.ports.containerPort")
    assert "FIELD: containerPort <integer>" in text
    assert "minimum: 1" in text
    assert text.count("maximum: 65535") == 1


def test_explain_list_type_and_required():
    text = explain("spec.template")
    assert "  containers\t<[]Container>" in text
    text = explain("spec.model")
    assert "  uri\t<string> -required-" in text


def test_explain_enum():
    assert "one of: Critical, Standard, Sheddable" in explain(
        "spec.model.criticality", api_version="serving.kserve.io/v1alpha1")


def test_explain_version_difference():
    with pytest.raises(ExplainError):
        explain("spec.model.criticality")


def test_explain_config_kind():
    assert explain("llminferenceserviceconfig.spec").startswith("KIND:     LLMInferenceServiceConfig")


def test_explain_unknown_field_suggests():
    with pytest.raises(ExplainError) as info:
        explain("llmisvc.spec.routr")
    assert str(info.value) == "field 'routr' does not exist in spec; did you mean 'router'?"


def test_explain_recursive():
    text = explain("spec.router.scheduler.pool", recursive=True)
    assert "      matchLabels\t<map[string]string>" in text
    assert "   spec\t<InferencePoolSpec>" in text


def test_explain_unknown_version():
    with pytest.raises(ExplainError):
        explain("spec", api_version="serving.kserve.io/v9")


def test_explain_shows_constraints_and_default():
    text = explain("spec.router.route.http.spec.rules")
    assert "items: 1 to 16" in text
    assert 'default: [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]' in text
    assert "unique by: name" in explain("spec.template.containers")


def test_explain_version_without_group():
    assert "VERSION:  serving.kserve.io/v1alpha1" in explain("spec", api_version="v1alpha1")
