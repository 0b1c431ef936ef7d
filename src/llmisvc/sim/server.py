"""HTTP surface of the simulated engine: the built-in engine's OpenAI API, health and metrics.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (streaming and usage with
`cached_tokens`), `GET /v1/models`, `GET /health`, `GET /metrics` (vLLM names),
`POST /tokenize`, `POST /detokenize`, plus simulator-only `GET /sim/state` (true cache contents and load, for
oracle policies) and `POST /sim/kv/release` (a decode replica frees blocks it pulled).
Request bodies are validated by `llmisvc.protocol.openai`, so errors match the engine's.
Two differences from the engine remain. Top-level fields the protocol does not define are
ignored and logged at debug level, as vLLM does, so routers that add their own fields work
against the simulator. Requests for prompt logprobs (`prompt_logprobs`, `echo` with
`logprobs` above 0, `echo` with `max_tokens` 0) are rejected with 400, because simulated
tokens have no model to score them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiohttp import ClientSession, ClientTimeout, web

from llmisvc.protocol import openai
from llmisvc.protocol.errors import APIError, BadRequestError, NotFoundError
from llmisvc.protocol.kv_transfer import KVTransferParams
from llmisvc.protocol.prompt_text import SIM_CHARS_PER_TOKEN, ChatRenderer, sim_detokenize, sim_token_ids
from llmisvc.sim.engine import RequestTooLargeError, SimEngine, SimRequest

logger = logging.getLogger(__name__)

# Every field the protocol module defines, implemented or not, so the parser still rejects
# known but unimplemented parameters (tools, suffix, best_of) with 400.
_COMPLETION_FIELDS = openai.COMPLETION_FIELDS
_CHAT_FIELDS = openai.CHAT_FIELDS


class SimServer:
    """aiohttp application of one simulated replica."""

    def __init__(self, engine: SimEngine, chat_renderer: ChatRenderer | None = None):
        self.engine = engine
        self.renderer = chat_renderer or ChatRenderer()
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics),
                web.post("/tokenize", self.tokenize),
                web.post("/detokenize", self.detokenize),
                web.get("/sim/state", self.sim_state),
                web.post("/sim/kv/release", self.kv_release),
            ]
        )
        self.app.on_cleanup.append(self._close_client)
        self._client: ClientSession | None = None
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------ simple routes

    async def models(self, request: web.Request) -> web.Response:
        config = self.engine.config
        return web.json_response(openai.models_response(list(config.served_model_names), "sim", config.max_model_len))

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.engine.render_metrics(), content_type="text/plain", charset="utf-8")

    async def sim_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.state())

    async def kv_release(self, request: web.Request) -> web.Response:
        try:
            body = openai.parse_json_body(await request.read())
            transfer_id = str(body["remote_request_id"])
        except (APIError, KeyError, TypeError) as exc:
            return _error_response(BadRequestError(f"invalid release request: {exc}", param="remote_request_id"))
        return web.json_response({"released": self.engine.release_transfer(transfer_id)})

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = openai.parse_json_body(await request.read())
            if not isinstance(body, dict):
                raise BadRequestError("request body must be a JSON object")
            if "messages" in body:
                chat_body = _drop_unknown_fields({**body, "model": body.get("model") or self.engine.model_name}, _CHAT_FIELDS, "/tokenize")
                text = self.renderer.render(openai.parse_chat_request(chat_body).messages)
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise BadRequestError("prompt (a string) or messages is required", param="prompt")
        except APIError as exc:
            return _error_response(exc)
        tokens = sim_token_ids(text).tolist()
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.config.max_model_len})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = openai.parse_json_body(await request.read())
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise BadRequestError("tokens must be a list of integer token ids", param="tokens")
        except APIError as exc:
            return _error_response(exc)
        return web.json_response({"prompt": sim_detokenize(tokens)})

    # ------------------------------------------------------------ generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = _drop_unknown_fields(openai.parse_json_body(await request.read()), _COMPLETION_FIELDS, request.path)
            parsed = openai.parse_completion_request(body)
            _reject_prompt_scoring(parsed)
            self._check_model(parsed.model)
            prompts = []
            for prompt in parsed.prompts:
                if isinstance(prompt, str):
                    prompts.append((sim_token_ids(prompt), prompt))
                else:
                    prompts.append((np.asarray(prompt, dtype=np.int64), None))
        except APIError as exc:
            return _error_response(exc)
        return await self._generate(request, "completion", parsed, prompts)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = _drop_unknown_fields(openai.parse_json_body(await request.read()), _CHAT_FIELDS, request.path)
            parsed = openai.parse_chat_request(body)
            _reject_prompt_scoring(parsed)
            self._check_model(parsed.model)
            text = self.renderer.render(parsed.messages, parsed.add_generation_prompt)
        except APIError as exc:
            return _error_response(exc)
        except ValueError as exc:  # chat template failure
            return _error_response(BadRequestError(str(exc), param="messages"))
        echo_text = parsed.messages[-1].content
        return await self._generate(request, "chat", parsed, [(sim_token_ids(text), echo_text)])

    def _check_model(self, model: str) -> None:
        if model not in self.engine.config.served_model_names:
            raise NotFoundError(f"The model `{model}` does not exist.", param="model")

    def _build_requests(self, parsed: Any, prompts: Sequence[tuple[np.ndarray, str | None]], request_id: str) -> list[SimRequest]:
        """Return one SimRequest per choice (prompt-major, then n)."""
        config = self.engine.config
        transfer = KVTransferParams.from_json(parsed.kv_transfer_params) if parsed.kv_transfer_params else None
        requests = []
        for prompt_index, (token_ids, echo_text) in enumerate(prompts):
            room = max(config.max_model_len - len(token_ids), 1)
            max_tokens = parsed.options.max_tokens if parsed.options.max_tokens is not None else min(config.default_max_tokens, room)
            pieces = None
            if config.echo and echo_text is not None:
                pieces = [echo_text[i : i + SIM_CHARS_PER_TOKEN] for i in range(0, len(echo_text), SIM_CHARS_PER_TOKEN)]
            for choice in range(parsed.options.n):
                seed = None if parsed.options.seed is None else parsed.options.seed + choice
                suffix = "" if len(prompts) * parsed.options.n == 1 else f"-{prompt_index}-{choice}"
                requests.append(SimRequest(request_id + suffix, token_ids, max_tokens, pieces, seed, transfer))
        return requests

    async def _generate(self, http_request: web.Request, kind: str, parsed: Any, prompts: list) -> web.StreamResponse:
        request_id = parsed.request_id or http_request.headers.get("x-request-id") or openai.new_request_id(kind)
        sims = self._build_requests(parsed, prompts, request_id)
        failure = self.engine.draw_failure()
        if failure is not None:
            logger.info("injecting failure %s into request %s", failure, request_id)
        if failure == "500":
            return _error_response(APIError("injected failure", code="injected_failure"))
        if failure == "drop":
            _drop_connection(http_request)
            return web.Response(status=500)
        if failure == "hang":
            # Hold the request until the client gives up; the handler is cancelled then.
            await asyncio.Event().wait()

        created = openai.now()
        try:
            if parsed.stream:
                return await self._stream(http_request, kind, parsed, sims, created, cut=failure == "cut")
            return await self._respond(http_request, kind, parsed, sims, created, cut=failure == "cut")
        except RequestTooLargeError as exc:
            return _error_response(BadRequestError(str(exc), param="max_tokens"))
        finally:
            self._release_remote(sims)

    async def _respond(self, http_request, kind, parsed, sims, created, cut: bool) -> web.StreamResponse:
        async def run(sim: SimRequest) -> None:
            async for _ in self.engine.generate(sim):
                pass

        await asyncio.gather(*(run(sim) for sim in sims))
        if cut:
            _drop_connection(http_request)
            return web.Response(status=500)
        usage = _usage(sims)
        transfer = sims[0].kv_transfer_response.to_json() if sims[0].kv_transfer_response else None
        model = parsed.model
        if kind == "chat":
            choices = [openai.chat_choice(i, "".join(s.output_text), s.finish_reason) for i, s in enumerate(sims)]
            body = openai.chat_response(sims[0].request_id, created, model, choices, usage, transfer)
        else:
            choices = [openai.completion_choice(i, "".join(s.output_text), s.finish_reason) for i, s in enumerate(sims)]
            body = openai.completion_response(sims[0].request_id, created, model, choices, usage, transfer)
        return web.json_response(body, headers={"x-request-id": http_request.headers.get("x-request-id", sims[0].request_id)})

    async def _stream(self, http_request, kind, parsed, sims, created, cut: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        response.headers["x-request-id"] = http_request.headers.get("x-request-id", sims[0].request_id)
        prepared = False
        model = parsed.model
        request_id = sims[0].request_id
        chunk = openai.chat_chunk if kind == "chat" else openai.completion_chunk

        for index, sim in enumerate(sims):
            expected = len(sim.output_pieces) if sim.output_pieces is not None else sim.max_tokens
            cut_after = max(expected // 2, 1)
            async for piece in self.engine.generate(sim):
                if not prepared:
                    await response.prepare(http_request)
                    prepared = True
                    if kind == "chat":
                        await response.write(openai.sse(chunk(request_id, created, model, [openai.chat_chunk_choice(index, {"role": "assistant", "content": ""})])))
                if kind == "chat" and sim.num_output_tokens == 1 and index > 0:
                    await response.write(openai.sse(chunk(request_id, created, model, [openai.chat_chunk_choice(index, {"role": "assistant", "content": ""})])))
                if kind == "chat":
                    choice = openai.chat_chunk_choice(index, {"content": piece})
                else:
                    choice = openai.completion_choice(index, piece, None)
                await response.write(openai.sse(chunk(request_id, created, model, [choice])))
                if cut and sim.num_output_tokens >= cut_after:
                    # Mid-stream cut: the connection ends without a final chunk or [DONE].
                    _drop_connection(http_request)
                    return response
            if kind == "chat":
                final = openai.chat_chunk_choice(index, {}, sim.finish_reason)
            else:
                final = openai.completion_choice(index, "", sim.finish_reason)
            await response.write(openai.sse(chunk(request_id, created, model, [final])))

        if not prepared:
            await response.prepare(http_request)
        if parsed.include_usage:
            await response.write(openai.sse(chunk(request_id, created, model, [], _usage(sims))))
        await response.write(openai.SSE_DONE)
        await response.write_eof()
        return response

    # ------------------------------------------------------------ KV transfer

    def _release_remote(self, sims: list[SimRequest]) -> None:
        """Tell a simulated prefill replica to free the blocks this decode pulled (best effort)."""
        transfer = sims[0].kv_transfer if sims else None
        if transfer is None or not transfer.do_remote_prefill or not transfer.remote_host or not transfer.remote_port:
            return
        transfer_id = transfer.extra.get("remote_request_id")
        if transfer_id is None:
            return
        task = asyncio.get_running_loop().create_task(self._post_release(transfer.remote_host, transfer.remote_port, transfer_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_release(self, host: str, port: int, transfer_id: str) -> None:
        if self._client is None:
            self._client = ClientSession(timeout=ClientTimeout(total=5))
        url = f"http://{host}:{port}/sim/kv/release"
        try:
            async with self._client.post(url, json={"remote_request_id": transfer_id}) as response:
                await response.read()
        except (OSError, asyncio.TimeoutError) as exc:
            # The prefill replica frees the blocks itself when its hold time ends.
            logger.warning("releasing KV blocks of %s at %s failed: %s", transfer_id, url, exc)

    async def _close_client(self, app: web.Application) -> None:
        for task in list(self._background):
            task.cancel()
        if self._client is not None:
            await self._client.close()


def _reject_prompt_scoring(parsed: openai.CompletionRequest | openai.ChatCompletionRequest) -> None:
    """Raise BadRequestError, naming the parameter, for requests that need prompt logprobs."""
    options = parsed.options
    if options.prompt_logprobs is not None:
        raise BadRequestError("prompt_logprobs is not supported by the simulator", param="prompt_logprobs")
    if not getattr(parsed, "echo", False):
        return
    if options.logprobs:
        raise BadRequestError("logprobs together with echo is not supported by the simulator", param="logprobs")
    if options.max_tokens == 0:
        raise BadRequestError("max_tokens 0 (scoring the echoed prompt) is not supported by the simulator", param="max_tokens")


def _usage(sims: list[SimRequest]) -> dict[str, Any]:
    # Prompt tokens count once per prompt, not once per choice, as OpenAI reports them.
    prompts = {id(sim.token_ids): sim for sim in sims}
    prompt_tokens = sum(len(sim.token_ids) for sim in prompts.values())
    cached = sum(sim.cached_tokens for sim in prompts.values())
    completion = sum(sim.num_output_tokens for sim in sims)
    return openai.usage(prompt_tokens, completion, cached)


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _error_response(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


def _drop_unknown_fields(body: Any, known: frozenset[str], route: str) -> Any:
    """Return `body` without the top-level fields outside `known`, logging them at debug level.

    vLLM's request models accept extra fields and only log them at debug level
    (`OpenAIBaseModel` in vllm/entrypoints/openai/engine/protocol.py), and routers rely on
    that when they add fields such as `no_stop_trim`. A body that is not an object is
    returned unchanged for the parser to reject.
    """
    if not isinstance(body, dict):
        return body
    unknown = body.keys() - known
    if not unknown:
        return body
    logger.debug("ignoring request fields not defined for %s: %s", route, ", ".join(sorted(unknown)))
    return {key: value for key, value in body.items() if key in known}
