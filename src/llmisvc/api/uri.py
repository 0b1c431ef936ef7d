"""Model URI schemes: which are valid in a spec and which need a cluster."""

from __future__ import annotations

import re

# s3 and oci are valid specs but need a cluster's storage initializer, so the local
# controller refuses them (see `needs_cluster_storage`).
LOCAL_URI_SCHEMES = ("hf", "pvc", "file")
CLUSTER_URI_SCHEMES = ("s3", "oci")
URI_SCHEMES = LOCAL_URI_SCHEMES + CLUSTER_URI_SCHEMES
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def uri_scheme(uri: str) -> str:
    """Return the scheme of a model URI (`hf`, `pvc`, `s3`, ...), or `file` for a plain path."""
    match = _URI_SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


def check_model_uri(uri: str) -> str | None:
    """Return why `uri` is not a valid model URI, or None when it is valid.

    Valid: hf://org/name, pvc://claim[/path], s3://bucket/key, oci://image, file:///path
    and plain paths.
    """
    if not uri.strip():
        return "must not be empty"
    scheme = uri_scheme(uri)
    if scheme not in URI_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in URI_SCHEMES)
        return f"unsupported URI scheme {scheme!r} in {uri!r}: use {allowed} or a plain path"
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    if scheme in ("hf", "pvc", "s3", "oci") and not rest.strip("/"):
        return f"{uri!r} names no {'repository' if scheme == 'hf' else 'location'} after {scheme}://"
    if scheme == "hf" and len([p for p in rest.split("/") if p]) < 1:
        return f"{uri!r} must name a repository as hf://org/name"
    return None


def needs_cluster_storage(uri: str) -> bool:
    """Return True when a model URI needs a cluster's storage initializer (s3://, oci://).

    Such URIs are valid specs and render for Kubernetes, but the local runtime refuses them.
    """
    return uri_scheme(uri) in CLUSTER_URI_SCHEMES
