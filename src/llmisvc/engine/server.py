"""The engine's HTTP server (aiohttp): OpenAI endpoints plus vLLM's operational endpoints.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`
(503 until the model is loaded, 200 after), `GET /metrics`, `POST /tokenize`,
`POST /detokenize`, `GET /version`, `POST /reset_prefix_cache`. The server listens before
the model is loaded, so supervisors can tell "loading" from "dead". Requests that need the
model get 503 meanwhile.

Errors are mapped to OpenAI error objects in one place (`_error_middleware`). When an API
key is configured, every path except `/health`, `/ping`, `/metrics` and `/version` needs
`Authorization: Bearer KEY` (compared in constant time).
The handler task is cancelled when its client disconnects, which aborts the request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

import llmisvc
from llmisvc.engine.llm_engine import LLMEngine
from llmisvc.engine.metrics import CONTENT_TYPE
from llmisvc.engine.serving import OpenAIServing
from llmisvc.protocol import headers, openai
from llmisvc.protocol.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    ServiceUnavailableError,
    error_body,
)

logger = logging.getLogger(__name__)

# Request bodies above this are rejected by aiohttp with 413 (long prompts as token-id lists
# can reach megabytes).
MAX_BODY_BYTES = 64 * 1024 * 1024
_OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})


@dataclass
class ServerConfig:
    """Settings of the HTTP layer besides the engine."""

    host: str
    port: int
    served_model_names: list[str]
    model_uri: str
    api_key: str | None = None


class EngineServer:
    """Own the aiohttp application; the engine is attached once the model has loaded.

    `engine_metrics_render` renders `/metrics` (the engine's registry). Use `run()` to serve
    until cancelled.
    """

    def __init__(self, config: ServerConfig, metrics_render: Callable[[], bytes] | None = None):
        self.config = config
        self.engine: LLMEngine | None = None
        self.serving: OpenAIServing | None = None
        self._metrics_render = metrics_render
        self.app = web.Application(
            middlewares=[self._request_id_middleware, self._error_middleware, self._auth_middleware],
            client_max_size=MAX_BODY_BYTES,
        )
        self.app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/ping", self.health),
                web.get("/metrics", self.metrics),
                web.post("/tokenize", self.tokenize),
                web.post("/detokenize", self.detokenize),
                web.get("/version", self.version),
                web.post("/reset_prefix_cache", self.reset_prefix_cache),
            ]
        )

    def attach(self, engine: LLMEngine, metrics_render: Callable[[], bytes] | None = None) -> None:
        """Start serving model requests with `engine` (called once the model is loaded)."""
        self.engine = engine
        self.serving = OpenAIServing(engine, self.config.served_model_names)
        if metrics_render is not None:
            self._metrics_render = metrics_render

    async def start(self) -> web.AppRunner:
        """Listen on the configured address and return the runner (call `runner.cleanup()` to stop)."""
        # handler_cancellation: a client that disconnects cancels its handler, which aborts
        # the engine request (aiohttp leaves it off by default since 3.7).
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        logger.info("engine HTTP server listening on http://%s:%d", self.config.host, self.config.port)
        return runner

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def _request_id_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        request_id = request.headers.get(headers.REQUEST_ID)
        if request_id:
            request["request_id"] = request_id
        response = await handler(request)
        if request_id and not response.prepared:
            response.headers[headers.REQUEST_ID] = request_id
        return response

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as exc:
            if exc.status >= 500:
                logger.error("%s %s failed: %s", request.method, request.path, exc.message)
            return web.json_response(exc.body(), status=exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = f"{exc.reason}: {request.method} {request.path}"
            return web.json_response(error_body(message, "invalid_request_error", None, exc.status), status=exc.status)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.path)
            return web.json_response(
                error_body(f"internal error: {exc}", "internal_server_error", None, 500), status=500
            )

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        key = self.config.api_key
        if key and request.path not in _OPEN_PATHS:
            supplied = request.headers.get("Authorization", "")
            expected = f"Bearer {key}"
            if not hmac.compare_digest(supplied.encode("utf-8"), expected.encode("utf-8")):
                raise AuthenticationError("invalid or missing API key; send Authorization: Bearer <key>")
        return await handler(request)

    # ------------------------------------------------------------------ helpers

    def _require_engine(self) -> tuple[LLMEngine, OpenAIServing]:
        if self.engine is None or self.serving is None:
            raise ServiceUnavailableError("the model is still loading")
        return self.engine, self.serving

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.config.served_model_names:
            raise NotFoundError(f"The model `{model}` does not exist.", param="model")

    @staticmethod
    async def _json(request: web.Request) -> Any:
        return openai.parse_json_body(await request.read())

    # ------------------------------------------------------------------ OpenAI

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        _, serving = self._require_engine()
        parsed = openai.parse_completion_request(await self._json(request))
        self._check_model(parsed.model)
        request_id = _response_id("cmpl", parsed.request_id)
        logger.debug("request %s (x-request-id %s): completion", request_id, request.get("request_id"))
        return await serving.completions(request, parsed, request_id)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        _, serving = self._require_engine()
        parsed = openai.parse_chat_request(await self._json(request))
        self._check_model(parsed.model)
        request_id = _response_id("chatcmpl", parsed.request_id)
        logger.debug("request %s (x-request-id %s): chat", request_id, request.get("request_id"))
        return await serving.chat(request, parsed, request_id)

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models."""
        max_model_len = self.engine.max_model_len if self.engine is not None else None
        body = openai.models_response(self.config.served_model_names, self.config.model_uri, max_model_len)
        return web.json_response(body)

    # ------------------------------------------------------------------ operations

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: 200 once the model is loaded and the engine thread runs, else 503."""
        if self.engine is None:
            return web.json_response(error_body("model is loading", "service_unavailable", None, 503), status=503)
        if not self.engine.is_alive:
            return web.json_response(error_body("engine thread stopped", "service_unavailable", None, 503), status=503)
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics in the Prometheus text format."""
        body = self._metrics_render() if self._metrics_render is not None else b""
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def version(self, request: web.Request) -> web.Response:
        """GET /version."""
        return web.json_response({"version": llmisvc.__version__})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """POST /reset_prefix_cache: drop every cached block (409 while requests hold blocks)."""
        engine, _ = self._require_engine()
        if not await engine.reset_prefix_cache():
            body = error_body("blocks are in use; retry when no request is running", "conflict_error", None, 409)
            return web.json_response(body, status=409)
        logger.info("prefix cache reset on request")
        return web.Response(status=200)

    async def tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize: `{prompt, add_special_tokens?}` or `{messages, add_generation_prompt?}`."""
        engine, serving = self._require_engine()
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadRequestError("request body must be a JSON object")
        self._check_model(body.get("model"))
        loop = asyncio.get_running_loop()
        if "messages" in body:
            chat = openai.parse_chat_request({"model": body.get("model") or self.config.served_model_names[0],
                                              **{k: v for k, v in body.items() if k in _TOKENIZE_CHAT_KEYS}})
            text = await loop.run_in_executor(None, serving.render_chat_prompt, chat)
            add_special = body.get("add_special_tokens", False)
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise BadRequestError("prompt must be a string", param="prompt")
            add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise BadRequestError("add_special_tokens must be a boolean", param="add_special_tokens")
        tokens = await loop.run_in_executor(None, lambda: engine.tokenizer.encode(text, add_special_tokens=add_special))
        result: dict[str, Any] = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
        if body.get("return_token_strs"):
            result["token_strs"] = [engine.tokenizer.id_to_token(t) for t in tokens]
        return web.json_response(result)

    async def detokenize(self, request: web.Request) -> web.Response:
        """POST /detokenize: `{tokens: [ids]}` → `{prompt: text}`."""
        engine, _ = self._require_engine()
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadRequestError("request body must be a JSON object")
        self._check_model(body.get("model"))
        tokens = body.get("tokens")
        vocab = engine.tokenizer.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
            raise BadRequestError(f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
        return web.json_response({"prompt": engine.tokenizer.decode(tokens)})


def _response_id(prefix: str, client_id: str | None) -> str:
    """Return the response id: the client's `request_id` field (prefixed) or a fresh one.

    A random suffix keeps engine-internal ids unique when clients reuse a request_id.
    """
    if client_id:
        return f"{prefix}-{client_id}-{uuid.uuid4().hex[:8]}"
    return openai.new_request_id("chat" if prefix == "chatcmpl" else "completion")


_TOKENIZE_CHAT_KEYS = frozenset({"messages", "add_generation_prompt", "continue_final_message", "chat_template_kwargs"})


async def serve_until_cancelled(server: EngineServer, load: Callable[[], Awaitable[None]]) -> None:
    """Listen, run `load()` (which attaches the engine), then serve until the task is cancelled."""
    runner = await server.start()
    try:
        await load()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
