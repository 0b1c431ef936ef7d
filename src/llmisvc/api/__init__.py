"""LLMInferenceService API: spec types, validation, presets, baseRefs merge, templates, status.

Knows nothing of engines or runtimes; the controller's planning step runs the checks that do.
"""

from llmisvc.api.errors import FieldError, SpecError
from llmisvc.api.load import Resource, load_document, load_documents, load_file
from llmisvc.api.resolve import ResolvedService, resolve, service_shape
from llmisvc.api.uri import needs_cluster_storage, uri_scheme

__all__ = [
    "FieldError", "Resource", "ResolvedService", "SpecError", "load_document", "load_documents",
    "load_file", "needs_cluster_storage", "resolve", "service_shape", "uri_scheme",
]
