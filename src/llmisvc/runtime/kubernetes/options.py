"""Images and defaults that rendering uses where the spec does not name its own."""

from __future__ import annotations

from dataclasses import dataclass

from llmisvc import __version__

# The image built from this repository's Dockerfile; it runs the engine, simulator,
# gateway, sidecar and operator.
LLMISVC_IMAGE = f"llmisvc/llmisvc:{__version__}"
# vLLM's official OpenAI-compatible server image, the default for GPU templates.
VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
# KServe's model downloader for hf:// and s3:// URIs, the release whose CRDs llmisvc accepts.
STORAGE_INITIALIZER_IMAGE = "kserve/storage-initializer:v0.20.0"

# The Gateway that KServe's controller attaches routes to when `router.gateway` names none.
DEFAULT_GATEWAY_NAME = "kserve-ingress-gateway"
DEFAULT_GATEWAY_NAMESPACE = "kserve"


@dataclass(frozen=True)
class RenderOptions:
    """Images and the default Gateway used when the spec leaves them unset."""

    llmisvc_image: str = LLMISVC_IMAGE
    vllm_image: str = VLLM_IMAGE
    storage_initializer_image: str = STORAGE_INITIALIZER_IMAGE
    gateway_name: str = DEFAULT_GATEWAY_NAME
    gateway_namespace: str = DEFAULT_GATEWAY_NAMESPACE
