"""Cross-field rules of a Gateway API HTTPRoute spec (`spec.router.route.http.spec`).

These are the CEL validations that the HTTPRoute schema embedded in KServe v0.20's CRD
carries (Gateway API v1 rules), so a route that a cluster would reject fails here too.
"""

from __future__ import annotations

import re
from typing import Any as AnyValue

from llmisvc.api.errors import FieldError

FILTER_FIELDS = {
    "CORS": "cors",
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
}
# Filter types that may appear once per list (every type except RequestMirror and ExtensionRef).
SINGLE_FILTERS = ("CORS", "RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite")
MAX_MATCHES_PER_ROUTE = 128
PATH_CHARACTERS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _dict(value: AnyValue) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: AnyValue) -> list:
    return value if isinstance(value, list) else []


def duration_seconds(text: str) -> float | None:
    """Return a Gateway API duration (`1h30m`, `500ms`) in seconds, or None if malformed."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def check_http_route(route: dict, path: str, errors: list[FieldError], check_paths: bool = True) -> None:
    """Check the cross-field rules of an HTTPRoute spec at `path`.

    `check_paths` False skips the rules on match paths and on URLRewrite path modifiers,
    which KServe v0.20's v1alpha2 LLMInferenceServiceConfig CRD does not carry. Presets put
    template actions in those values, and the rules apply again to the rendered service.
    """
    rules = _list(route.get("rules"))
    total_matches = sum(len(_list(_dict(rule).get("matches"))) for rule in rules)
    if total_matches > MAX_MATCHES_PER_ROUTE:
        errors.append(FieldError(f"{path}.rules", f"must have at most {MAX_MATCHES_PER_ROUTE} matches across "
                                                  f"all rules, got {total_matches}"))
    for i, rule in enumerate(rules):
        if isinstance(rule, dict):
            _check_rule(rule, f"{path}.rules[{i}]", errors, check_paths)


def _check_rule(rule: dict, path: str, errors: list[FieldError], check_paths: bool) -> None:
    filters = _list(rule.get("filters"))
    backend_refs = _list(rule.get("backendRefs"))
    _check_filters(filters, f"{path}.filters", errors, check_paths)

    if backend_refs and any("requestRedirect" in _dict(f) for f in filters):
        errors.append(FieldError(f"{path}.filters", "a RequestRedirect filter must not be used together with "
                                                    "backendRefs"))
    # Absent matches default to one PathPrefix "/" match, and an absent path type to PathPrefix.
    matches = _list(rule.get("matches")) if "matches" in rule else [{}]
    single_prefix_match = len(matches) == 1 and _dict(_dict(matches[0]).get("path")).get("type", "PathPrefix") == "PathPrefix"
    prefix_rewrites = [f for f in filters if _replaces_prefix(f)]
    for j, ref in enumerate(backend_refs):
        ref = _dict(ref)
        ref_filters = _list(ref.get("filters"))
        _check_filters(ref_filters, f"{path}.backendRefs[{j}].filters", errors, check_paths)
        prefix_rewrites += [f for f in ref_filters if _replaces_prefix(f)]
        _check_backend_port(ref, f"{path}.backendRefs[{j}]", errors)
    if prefix_rewrites and not single_prefix_match:
        errors.append(FieldError(f"{path}.matches", "a filter with path.replacePrefixMatch needs exactly one "
                                                    "match, of type PathPrefix"))

    for j, match in enumerate(matches if check_paths else []):
        _check_path_match(_dict(_dict(match).get("path")), f"{path}.matches[{j}].path", errors)
    _check_session_persistence(_dict(rule.get("sessionPersistence")), f"{path}.sessionPersistence", errors)
    _check_timeouts(_dict(rule.get("timeouts")), f"{path}.timeouts", errors)


def _replaces_prefix(route_filter: AnyValue) -> bool:
    route_filter = _dict(route_filter)
    for key in ("requestRedirect", "urlRewrite"):
        modifier = _dict(_dict(route_filter.get(key)).get("path"))
        if modifier.get("type") == "ReplacePrefixMatch" and "replacePrefixMatch" in modifier:
            return True
    return False


def _check_filters(filters: list, path: str, errors: list[FieldError], check_paths: bool) -> None:
    types = [_dict(f).get("type") for f in filters]
    for kind in SINGLE_FILTERS:
        if types.count(kind) > 1:
            errors.append(FieldError(path, f"the {kind} filter must not be repeated"))
    if "RequestRedirect" in types and "URLRewrite" in types:
        errors.append(FieldError(path, "use either a RequestRedirect or a URLRewrite filter, not both"))

    for i, route_filter in enumerate(filters):
        route_filter = _dict(route_filter)
        kind = route_filter.get("type")
        for filter_type, field_name in FILTER_FIELDS.items():
            if field_name in route_filter and kind != filter_type:
                errors.append(FieldError(f"{path}[{i}].{field_name}", f"must be unset unless type is {filter_type}"))
            if kind == filter_type and field_name not in route_filter:
                errors.append(FieldError(f"{path}[{i}].{field_name}", f"is required for type {filter_type}"))
        _check_filter_details(route_filter, f"{path}[{i}]", errors, check_paths)


def _check_filter_details(route_filter: dict, path: str, errors: list[FieldError], check_paths: bool) -> None:
    cors = _dict(route_filter.get("cors"))
    for key in ("allowHeaders", "allowMethods", "allowOrigins"):
        values = _list(cors.get(key))
        if "*" in values and len(values) > 1:
            errors.append(FieldError(f"{path}.cors.{key}", "must not contain '*' beside other values"))

    auth = _dict(route_filter.get("externalAuth"))
    if auth:
        protocol = auth.get("protocol")
        for key, expected in (("grpc", "GRPC"), ("http", "HTTP")):
            if key in auth and protocol != expected:
                errors.append(FieldError(f"{path}.externalAuth.protocol", f"must be {expected} when {key} is set"))
            if protocol == expected and key not in auth:
                errors.append(FieldError(f"{path}.externalAuth.{key}", f"is required when protocol is {expected}"))
        _check_backend_port(_dict(auth.get("backendRef")), f"{path}.externalAuth.backendRef", errors)

    mirror = _dict(route_filter.get("requestMirror"))
    if mirror:
        if "percent" in mirror and "fraction" in mirror:
            errors.append(FieldError(f"{path}.requestMirror", "set either percent or fraction, not both"))
        fraction = _dict(mirror.get("fraction"))
        numerator, denominator = fraction.get("numerator"), fraction.get("denominator", 100)
        if isinstance(numerator, int) and isinstance(denominator, int) and numerator > denominator:
            errors.append(FieldError(f"{path}.requestMirror.fraction.numerator",
                                     f"must be <= denominator ({denominator}), got {numerator}"))
        _check_backend_port(_dict(mirror.get("backendRef")), f"{path}.requestMirror.backendRef", errors)

    for key in ("requestRedirect", "urlRewrite") if check_paths else ("requestRedirect",):
        modifier = _dict(_dict(route_filter.get(key)).get("path"))
        for field_name in ("replaceFullPath", "replacePrefixMatch"):
            wanted = field_name[0].upper() + field_name[1:]
            if field_name in modifier and modifier.get("type") != wanted:
                errors.append(FieldError(f"{path}.{key}.path.type", f"must be {wanted} when {field_name} is set"))
            if modifier.get("type") == wanted and field_name not in modifier:
                errors.append(FieldError(f"{path}.{key}.path.{field_name}", f"is required when type is {wanted}"))


def _check_backend_port(ref: dict, path: str, errors: list[FieldError]) -> None:
    if ref and ref.get("group", "") == "" and ref.get("kind", "Service") == "Service" and "port" not in ref:
        errors.append(FieldError(f"{path}.port", "is required for a Service reference"))


def _check_path_match(match: dict, path: str, errors: list[FieldError]) -> None:
    kind, value = match.get("type", "PathPrefix"), match.get("value", "/")
    if kind not in ("Exact", "PathPrefix") or not isinstance(value, str):
        return
    if not value.startswith("/"):
        errors.append(FieldError(f"{path}.value", f"must be an absolute path starting with '/', got {value!r}"))
    for part in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if part in value:
            errors.append(FieldError(f"{path}.value", f"must not contain {part!r}, got {value!r}"))
    for suffix in ("/..", "/."):
        if value.endswith(suffix):
            errors.append(FieldError(f"{path}.value", f"must not end with {suffix!r}, got {value!r}"))
    if value and not PATH_CHARACTERS.match(value):
        errors.append(FieldError(f"{path}.value", f"contains characters not allowed in a URL path: {value!r}"))


def _check_session_persistence(session: dict, path: str, errors: list[FieldError]) -> None:
    cookie = _dict(session.get("cookieConfig"))
    if "cookieConfig" in session and session.get("type", "Cookie") != "Cookie":
        errors.append(FieldError(f"{path}.cookieConfig", "may only be set with type Cookie"))
    if cookie.get("lifetimeType") == "Permanent" and "absoluteTimeout" not in session:
        errors.append(FieldError(f"{path}.absoluteTimeout", "is required when cookieConfig.lifetimeType is Permanent"))


def _check_timeouts(timeouts: dict, path: str, errors: list[FieldError]) -> None:
    request, backend = timeouts.get("request"), timeouts.get("backendRequest")
    if not isinstance(request, str) or not isinstance(backend, str):
        return
    request_seconds, backend_seconds = duration_seconds(request), duration_seconds(backend)
    if request_seconds and backend_seconds is not None and backend_seconds > request_seconds:
        errors.append(FieldError(f"{path}.backendRequest", f"must not be longer than request ({request}), "
                                                           f"got {backend}"))
