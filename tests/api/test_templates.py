"""Go-template rendering and ChildName."""

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec_factory import config, dump, minimal_service

from llmisvc.api import SpecError, load_documents, resolve
from llmisvc.api.templates import TemplateContext, child_name, render_object, render_string


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@pytest.mark.parametrize("length", [62, 63])
def test_child_name_short_parent_unchanged(length):
    parent = "p" * length
    assert child_name(parent, "") == parent


def test_child_name_concatenation_at_limit():
    assert child_name("a" * 56, "-kserve") == "a" * 56 + "-kserve"


@pytest.mark.parametrize("length", [64, 100])
def test_child_name_long_parent_hashed(length):
    parent = "p" * length
    name = child_name(parent, "")
    assert len(name) == 63
    assert name == "p" * 31 + _md5(parent)


@pytest.mark.parametrize("length", [62, 63, 64, 100])
def test_child_name_with_suffix_fits(length):
    parent = "q" * length
    name = child_name(parent, "-kserve-workload-svc")
    assert len(name) <= 63
    assert name == "q" * (31 - len("-kserve-workload-svc")) + _md5(parent) + "-kserve-workload-svc"


def test_child_name_distinct_for_distinct_parents():
    assert child_name("x" * 70 + "a", "-kserve") != child_name("x" * 70 + "b", "-kserve")


def test_child_name_forty_char_suffix():
    parent, suffix = "r" * 40, "-" + "s" * 39
    name = child_name(parent, suffix)
    assert len(name) == 63
    assert name == "r" * 31 + _md5(parent + suffix)


def test_child_name_long_suffix_padded():
    parent, suffix = "ab", "-" + "s" * 61
    name = child_name(parent, suffix)
    assert name == ("ab" + _md5(parent + suffix) + suffix)[:63]
    assert len(name) == 63


def test_child_name_strips_trailing_dash():
    parent, suffix = "t" * 10, "-" * 60
    name = child_name(parent, suffix)
    assert not name.endswith("-")
    assert name == "t" * 10 + _md5(parent + suffix)


CONTEXT = TemplateContext(
    {"metadata": {"name": "svc", "namespace": "team"}, "spec": {"model": {"name": "llama", "uri": "hf://a/b"}}},
    {"GatewayName": "gw"},
)


@pytest.mark.parametrize("text,expected", [
    ('{{ ChildName .ObjectMeta.Name "-inference-pool" }}', "svc-inference-pool"),
    ("{{ ChildName .ObjectMeta.Name `-epp-sa` }}", "svc-epp-sa"),
    ("{{.ObjectMeta.Name}}", "svc"),
    ("{{- .ObjectMeta.Namespace -}}", "team"),
    ("a  {{- .ObjectMeta.Name -}}  b", "asvcb"),
    ("a {{ .ObjectMeta.Name }} b", "a svc b"),
    ('{{ "{{" }} message.content {{ "}}" }}', "{{ message.content }}"),
    ("{{ `literal` }}", "literal"),
    ("/{{ .ObjectMeta.Namespace }}/{{ .ObjectMeta.Name }}/v1", "/team/svc/v1"),
    ("{{ .Spec.Model.Name }}", "llama"),
    ("{{ .Spec.Model.URI }}", "hf://a/b"),
    ("{{ .GlobalConfig.GatewayName }}", "gw"),
    ("no template here", "no template here"),
])
def test_render_string(text, expected):
    assert render_string(text, CONTEXT) == expected


def test_unknown_key_names_it():
    with pytest.raises(KeyError) as info:
        render_string("{{ .Spec.Model.Revision }}", CONTEXT)
    assert "unknown template key .Spec.Model.Revision" in str(info.value)


def test_unknown_global_config_key():
    with pytest.raises(KeyError) as info:
        render_string("{{ .GlobalConfig.Missing }}", CONTEXT)
    assert ".GlobalConfig.Missing" in str(info.value)


def test_unterminated_action_rejected():
    with pytest.raises(ValueError) as info:
        render_string("{{ .ObjectMeta.Name", CONTEXT)
    assert "unterminated template action" in str(info.value)


def test_unsupported_action_rejected():
    with pytest.raises(ValueError) as info:
        render_string("{{ .ObjectMeta.Name | upper }}", CONTEXT)
    assert "unsupported template action" in str(info.value)


def test_render_object_reports_field_path():
    value = {"containers": [{"name": "main", "args": ["--x", "{{ .Bogus }}"]}]}
    with pytest.raises(SpecError) as info:
        render_object(value, CONTEXT, "spec.template")
    assert info.value.errors[0].path == "spec.template.containers[0].args[1]"
    assert "unknown template key .Bogus" in info.value.errors[0].reason


def test_resolve_renders_templates_in_service():
    service = minimal_service(name="tmpl", template={"containers": [
        {"name": "main", "args": ['--served-as={{ ChildName .ObjectMeta.Name "-x" }}', "{{ .Spec.Model.Name }}"]}]})
    (resource,) = load_documents(dump(service))
    assert resolve(resource).main_container["args"] == ["--served-as=tmpl-x", "tmpl"]


def test_resolve_unknown_key_in_base_ref():
    base = config("bad", template={"containers": [{"name": "main", "args": ["{{ .ObjectMeta.Labels }}"]}]})
    resources = load_documents(dump(base, minimal_service(baseRefs=[{"name": "bad"}])))
    with pytest.raises(SpecError) as info:
        resolve(resources[1], {"bad": resources[0]})
    assert info.value.errors[0].path == "spec.template.containers[0].args[0]"
    assert ".ObjectMeta.Labels" in info.value.errors[0].reason


def test_resolve_global_config_override():
    (resource,) = load_documents(dump(minimal_service(router={"route": {}})))
    resolved = resolve(resource, global_config={"GatewayName": "site-gateway"})
    parent = resolved.spec["router"]["route"]["http"]["spec"]["parentRefs"][0]
    assert parent["name"] == "site-gateway"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=120),
       st.text(alphabet="abcxyz0123456789-", max_size=70))
def test_child_name_properties(parent, suffix):
    name = child_name(parent, suffix)
    if len(parent) + len(suffix) <= 63:
        assert name == parent + suffix
    else:
        assert len(name) <= 63
        assert name == "" or name[-1].isalnum()
    assert child_name(parent, suffix) == name


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}-. "`\\abcOMNGCehijlmnoprstuy', max_size=60))
def test_render_string_fails_only_with_template_errors(text):
    try:
        rendered = render_string(text, CONTEXT)
    except (KeyError, ValueError):
        return
    if "{{" not in text:
        assert rendered == text
