"""OpenAI completions and chat completions on top of the engine core.

Turns a validated request into tokenised `EngineRequest`s, runs them through
`LLMEngine.generate`, and writes either one JSON response or a server-sent event stream in
OpenAI's shapes (`llmisvc.protocol.openai`). Choice indexes are prompt-major: prompt `p`,
choice `i` of `n` has index `p * n + i`. A client that disconnects cancels the handler, which
closes the engine stream and aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llmisvc.engine.llm_engine import LLMEngine, RequestOutput, SequenceDelta
from llmisvc.engine.sequence import EngineRequest
from llmisvc.protocol import openai
from llmisvc.protocol.errors import APIError, BadRequestError
from llmisvc.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingOptions

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass
class _Choice:
    """Accumulated output of one choice for a non-streamed response."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprob_tokens: list[str] = field(default_factory=list)
    logprob_values: list[float] = field(default_factory=list)
    logprob_tops: list[list[tuple[str, float]]] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    length: int = 0


class OpenAIServing:
    """Serve `/v1/completions` and `/v1/chat/completions` for one engine."""

    def __init__(self, engine: LLMEngine, model_names: list[str]):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_names = model_names
        # A token id past the model's embedding table would fail the whole engine step, so
        # prompts are checked against the smaller of the two vocabularies.
        self._vocab_size = min(self.tokenizer.vocab_size, engine.runner.config.vocab_size)

    # ------------------------------------------------------------------ entry points

    async def completions(self, http_request: web.Request, request: CompletionRequest, request_id: str) -> web.StreamResponse:
        """Run a completion request and return its response (JSON or SSE)."""
        loop = asyncio.get_running_loop()
        prompt_ids: list[list[int]] = []
        prompt_texts: list[str] = []
        for i, prompt in enumerate(request.prompts):
            if isinstance(prompt, str):
                prompt_ids.append(await loop.run_in_executor(None, self.tokenizer.encode, prompt))
                prompt_texts.append(prompt)
            else:
                self._check_token_ids(prompt, f"prompt[{i}]" if len(request.prompts) > 1 else "prompt")
                prompt_ids.append(prompt)
                prompt_texts.append(self.tokenizer.decode(prompt, False) if request.echo else "")
        engine_requests = self._engine_requests(request_id, prompt_ids, request.options, request)

        echo = prompt_texts if request.echo else None
        if request.stream:
            return await self._stream(http_request, request_id, request, engine_requests, chat=False, echo=echo)
        return await self._respond(request_id, request, engine_requests, chat=False, echo=echo)

    async def chat(self, http_request: web.Request, request: ChatCompletionRequest, request_id: str) -> web.StreamResponse:
        """Render the chat template, run the request and return its response (JSON or SSE)."""
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(None, self._render_chat, request)
        ids = await loop.run_in_executor(None, lambda: self.tokenizer.encode(prompt, add_special_tokens=False))
        engine_requests = self._engine_requests(request_id, [ids], request.options, request, param="messages")
        if request.stream:
            return await self._stream(http_request, request_id, request, engine_requests, chat=True)
        return await self._respond(request_id, request, engine_requests, chat=True)

    def render_chat_prompt(self, request: ChatCompletionRequest) -> str:
        """Return the prompt text the chat template produces for `request`."""
        return self._render_chat(request)

    # ------------------------------------------------------------------ request preparation

    def _render_chat(self, request: ChatCompletionRequest) -> str:
        messages = []
        for message in request.messages:
            # OpenAI's "developer" role replaces "system"; model templates only know the latter.
            role = "system" if message.role == "developer" else message.role
            entry: dict[str, Any] = {"role": role, "content": message.content}
            if message.name is not None:
                entry["name"] = message.name
            messages.append(entry)
        add_generation_prompt = request.add_generation_prompt and not request.continue_final_message
        kwargs = dict(request.chat_template_kwargs)
        kwargs.pop("add_generation_prompt", None)
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        if request.continue_final_message:
            # Cut the rendered text right after the final message, dropping its end-of-turn markup.
            final = messages[-1]["content"]
            at = prompt.rfind(final)
            if at == -1:
                raise BadRequestError("the chat template dropped the final message's content", param="messages")
            prompt = prompt[: at + len(final)]
        return prompt

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        for token_id in token_ids:
            if token_id >= self._vocab_size:
                raise BadRequestError(
                    f"token id {token_id} in {param} is outside the vocabulary (size {self._vocab_size})", param="prompt"
                )

    def _engine_requests(
        self,
        request_id: str,
        prompts: list[list[int]],
        options: SamplingOptions,
        request: CompletionRequest | ChatCompletionRequest,
        param: str = "prompt",
    ) -> list[EngineRequest]:
        salt = request.cache_salt.encode("utf-8") if request.cache_salt else b""
        requests = []
        for i, ids in enumerate(prompts):
            max_tokens = self.engine.resolve_max_tokens(len(ids), options.max_tokens, param)
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            requests.append(
                EngineRequest(
                    request_id=engine_id,
                    prompt_token_ids=ids,
                    options=options,
                    max_tokens=max_tokens,
                    kv_transfer_params=request.kv_transfer_params,
                    hash_extra=salt,
                )
            )
        return requests

    # ------------------------------------------------------------------ non-streamed

    async def _respond(
        self,
        request_id: str,
        request: CompletionRequest | ChatCompletionRequest,
        engine_requests: list[EngineRequest],
        *,
        chat: bool,
        echo: list[str] | None = None,
    ) -> web.Response:
        n = request.options.n
        choices = {p * n + i: _Choice() for p in range(len(engine_requests)) for i in range(n)}
        if echo is not None:
            for index, choice in choices.items():
                choice.text.append(echo[index // n])
                choice.length = len(echo[index // n])

        last: RequestOutput | None = None
        async with contextlib.aclosing(self.engine.generate(engine_requests)) as stream:
            async for output in stream:
                last = output
                for delta in output.deltas:
                    self._accumulate(choices[delta.prompt_index * n + delta.index], delta)

        created = openai.now()
        usage = openai.usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens)
        logprobs_on = request.options.logprobs is not None
        if chat:
            body = openai.chat_response(
                request_id,
                created,
                request.model,
                [
                    openai.chat_choice(
                        index,
                        "".join(c.text),
                        c.finish_reason,
                        c.stop_reason,
                        self._chat_logprobs(c) if logprobs_on else None,
                    )
                    for index, c in sorted(choices.items())
                ],
                usage,
                last.kv_transfer_params,
            )
        else:
            body = openai.completion_response(
                request_id,
                created,
                request.model,
                [
                    openai.completion_choice(
                        index,
                        "".join(c.text),
                        c.finish_reason,
                        c.stop_reason,
                        self._completion_logprobs(c) if logprobs_on else None,
                    )
                    for index, c in sorted(choices.items())
                ],
                usage,
                last.kv_transfer_params,
            )
        return web.json_response(body)

    def _accumulate(self, choice: _Choice, delta: SequenceDelta) -> None:
        if delta.logprobs:
            offset = choice.length
            for entry in delta.logprobs:
                choice.logprob_tokens.append(self._token_text(entry.token_id))
                choice.logprob_values.append(entry.logprob)
                choice.logprob_tops.append([(self._token_text(t), lp) for t, lp in entry.top])
                choice.text_offsets.append(offset)
        choice.text.append(delta.text)
        choice.length += len(delta.text)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason

    # ------------------------------------------------------------------ streamed

    async def _stream(
        self,
        http_request: web.Request,
        request_id: str,
        request: CompletionRequest | ChatCompletionRequest,
        engine_requests: list[EngineRequest],
        *,
        chat: bool,
        echo: list[str] | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        response.headers.update(_passthrough_headers(http_request))
        await response.prepare(http_request)
        n = request.options.n
        created = openai.now()
        num_choices = len(engine_requests) * n
        offsets = [len(echo[i // n]) if echo else 0 for i in range(num_choices)]

        first = []
        for index in range(num_choices):
            if chat:
                delta = {"role": "assistant", "content": ""}
                first.append(openai.sse(openai.chat_chunk(request_id, created, request.model, [openai.chat_chunk_choice(index, delta)])))
            elif echo:
                choice = openai.completion_choice(index, echo[index // n], None)
                first.append(openai.sse(openai.completion_chunk(request_id, created, request.model, [choice])))
        if first:
            await response.write(b"".join(first))

        try:
            async with contextlib.aclosing(self.engine.generate(engine_requests)) as stream:
                async for output in stream:
                    events = []
                    usage = None
                    if request.continuous_usage_stats:
                        usage = openai.usage(output.num_prompt_tokens, output.num_output_tokens, output.num_cached_tokens)
                    for delta in output.deltas:
                        index = delta.prompt_index * n + delta.index
                        if not delta.text and delta.finish_reason is None and not delta.logprobs:
                            continue
                        events.append(self._chunk(request_id, created, request, delta, index, offsets, chat, usage))
                        offsets[index] += len(delta.text)
                    if output.finished and request.include_usage:
                        final_usage = openai.usage(output.num_prompt_tokens, output.num_output_tokens, output.num_cached_tokens)
                        builder = openai.chat_chunk if chat else openai.completion_chunk
                        events.append(openai.sse(builder(request_id, created, request.model, [], final_usage)))
                    if events:
                        await response.write(b"".join(events))
        except APIError as exc:
            # Headers are sent: the error can only travel as an event.
            logger.warning("request %s failed while streaming: %s", request_id, exc.message)
            await response.write(openai.sse(exc.body()))
        await response.write(openai.SSE_DONE)
        await response.write_eof()
        return response

    def _chunk(
        self,
        request_id: str,
        created: int,
        request: CompletionRequest | ChatCompletionRequest,
        delta: SequenceDelta,
        index: int,
        offsets: list[int],
        chat: bool,
        usage: dict[str, Any] | None,
    ) -> bytes:
        if chat:
            logprobs = None
            if delta.logprobs is not None:
                logprobs = {"content": [self._chat_entry(e.token_id, e.logprob, e.top) for e in delta.logprobs]}
            content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
            choice = openai.chat_chunk_choice(index, content, delta.finish_reason, delta.stop_reason, logprobs)
            return openai.sse(openai.chat_chunk(request_id, created, request.model, [choice], usage))

        logprobs = None
        if delta.logprobs is not None:
            partial = _Choice(length=offsets[index])
            self._accumulate(partial, SequenceDelta(0, 0, "", [], delta.logprobs))
            logprobs = self._completion_logprobs(partial)
        choice = openai.completion_choice(index, delta.text, delta.finish_reason, delta.stop_reason, logprobs)
        return openai.sse(openai.completion_chunk(request_id, created, request.model, [choice], usage))

    # ------------------------------------------------------------------ logprobs

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        return openai.chat_logprob_entry(
            self._token_text(token_id), logprob, [(self._token_text(t), lp) for t, lp in top]
        )

    def _chat_logprobs(self, choice: _Choice) -> dict[str, Any]:
        return {
            "content": [
                openai.chat_logprob_entry(token, value, top)
                for token, value, top in zip(choice.logprob_tokens, choice.logprob_values, choice.logprob_tops)
            ]
        }

    def _completion_logprobs(self, choice: _Choice) -> dict[str, Any]:
        return openai.completion_logprobs(
            choice.logprob_tokens,
            choice.logprob_values,
            [dict(top) for top in choice.logprob_tops],
            choice.text_offsets,
        )


def _passthrough_headers(http_request: web.Request) -> dict[str, str]:
    request_id = http_request.get("request_id")
    return {"x-request-id": request_id} if request_id else {}
