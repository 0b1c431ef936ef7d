"""llmisvc: an LLM inference service platform for KServe LLMInferenceService specs."""

__version__ = "0.1.0"
