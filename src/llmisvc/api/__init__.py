"""LLMInferenceService API: spec types, validation, presets, baseRefs merge, templates, status.

Knows nothing of engines or runtimes; the controller's planning step runs the checks that do.
"""
