"""OpenAI completions and chat completions on top of the engine core.

Turns a validated request into tokenised `EngineRequest`s, runs them through
`LLMEngine.generate`, and writes either one JSON response or a server-sent event stream in
OpenAI's shapes (`llmisvc.protocol.openai`). Choice indexes are prompt-major: prompt `p`,
choice `i` of `n` has index `p * n + i`. A client that disconnects cancels the handler, which
closes the engine stream and aborts the request.

Prompt logprobs appear in two places. A completion with `echo` and `logprobs` lists the
prompt tokens before the generated ones in its `logprobs` (the first prompt token with null
values). vLLM's `prompt_logprobs` list is added to each completion choice, or once to a chat
response, when the request sets `prompt_logprobs` or (as vLLM does) echoes with `logprobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llmisvc.engine.llm_engine import LLMEngine, RequestOutput, SequenceDelta
from llmisvc.engine.sampler import PromptLogprobs
from llmisvc.engine.sequence import EngineRequest
from llmisvc.engine.tokenizer import IncrementalDetokenizer
from llmisvc.protocol import openai
from llmisvc.protocol.errors import APIError, BadRequestError
from llmisvc.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingOptions

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass
class _Choice:
    """Accumulated output of one choice for a non-streamed response.

    The logprob lists contain None for the first prompt token of an echo. `prompt_logprobs`
    is vLLM's list, set when the request calls for it.
    """

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprob_tokens: list[str] = field(default_factory=list)
    logprob_values: list[float | None] = field(default_factory=list)
    logprob_tops: list[list[tuple[str, float]] | None] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    length: int = 0
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class OpenAIServing:
    """Serve `/v1/completions` and `/v1/chat/completions` for one engine."""

    def __init__(self, engine: LLMEngine, model_names: list[str]):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_names = model_names
        # A token id past the model's embedding table would fail the whole engine step, so
        # prompts are checked against the smaller of the two vocabularies.
        self._vocab_size = min(self.tokenizer.vocab_size, engine.runner.config.vocab_size)
        # Decoded text of single tokens (at most one entry per vocabulary token), because
        # prompt logprobs decode thousands of them per request.
        self._token_texts: dict[int, str] = {}

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
        prompt_logprobs = _engine_prompt_logprobs(request)
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
                    prompt_logprobs=prompt_logprobs,
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

        echo_top = request.options.logprobs if echo is not None else None
        listed_top = _listed_prompt_logprobs(request)
        last: RequestOutput | None = None
        async with contextlib.aclosing(self.engine.generate(engine_requests)) as stream:
            async for output in stream:
                last = output
                for delta in output.deltas:
                    choice = choices[delta.prompt_index * n + delta.index]
                    if delta.prompt_logprobs is not None:
                        prompt_ids = engine_requests[delta.prompt_index].prompt_token_ids
                        if echo_top is not None:
                            echo_text = echo[delta.prompt_index]
                            self._add_echo_logprobs(choice, prompt_ids, echo_text, delta.prompt_logprobs, echo_top)
                        if listed_top is not None:
                            choice.prompt_logprobs = self._listed_logprobs(prompt_ids, delta.prompt_logprobs, listed_top)
                    self._accumulate(choice, delta)

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
                choices[0].prompt_logprobs,
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
                        c.prompt_logprobs,
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
        # An echo with logprobs waits for the prompt's logprobs, which come with the first delta.
        echo_waiting = set(range(num_choices)) if echo and request.options.logprobs is not None else set()

        first = []
        for index in range(num_choices):
            if chat:
                delta = {"role": "assistant", "content": ""}
                first.append(openai.sse(openai.chat_chunk(request_id, created, request.model, [openai.chat_chunk_choice(index, delta)])))
            elif echo and index not in echo_waiting:
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
                        if index in echo_waiting:
                            echo_waiting.discard(index)
                            prompt_ids = engine_requests[delta.prompt_index].prompt_token_ids
                            events.append(self._echo_chunk(request_id, created, request, index, echo[index // n], prompt_ids, delta))
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

    def _echo_chunk(
        self,
        request_id: str,
        created: int,
        request: CompletionRequest,
        index: int,
        echo_text: str,
        prompt_ids: list[int],
        delta: SequenceDelta,
    ) -> bytes:
        """Return the chunk that echoes a choice's prompt with the prompt's logprobs."""
        partial = _Choice()
        if delta.prompt_logprobs is not None:
            top = request.options.logprobs or 0
            self._add_echo_logprobs(partial, prompt_ids, echo_text, delta.prompt_logprobs, top)
        choice = openai.completion_choice(index, echo_text, None, None, self._completion_logprobs(partial))
        return openai.sse(openai.completion_chunk(request_id, created, request.model, [choice]))

    # ------------------------------------------------------------------ logprobs

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _add_echo_logprobs(
        self, choice: _Choice, prompt_ids: list[int], echo_text: str, scored: PromptLogprobs, top: int
    ) -> None:
        """Append the prompt's tokens to `choice`'s logprob lists, with up to `top` alternatives each.

        The first prompt token has no logprob (None). Text offsets index `echo_text`, and a
        token that ends inside a multi-byte character starts where that character does.
        """
        # A string prompt's echo lacks the special tokens the tokenizer added (a BOS, for
        # example), so those take no characters. A token-id prompt's echo renders them.
        with_special = self.tokenizer.decode(prompt_ids, skip_special_tokens=False) == echo_text
        detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=not with_special)
        for position, token_id in enumerate(prompt_ids):
            choice.text_offsets.append(len(detokenizer.text))
            detokenizer.add([token_id])
            choice.logprob_tokens.append(self._token_text(token_id))
            if position == 0:
                choice.logprob_values.append(None)
                choice.logprob_tops.append(None)
                continue
            entry = position - 1
            choice.logprob_values.append(scored.logprobs[entry])
            alternatives = zip(scored.top_ids[entry][:top], scored.top_logprobs[entry][:top])
            choice.logprob_tops.append([(self._token_text(t), lp) for t, lp in alternatives])

    def _listed_logprobs(self, prompt_ids: list[int], scored: PromptLogprobs, top: int) -> list[dict[str, Any] | None]:
        """Return vLLM's `prompt_logprobs` list: None, then each later prompt token and its `top` alternatives."""
        positions: list[dict[str, Any] | None] = [None]
        for entry, token_id in enumerate(prompt_ids[1:]):
            alternatives = zip(scored.top_ids[entry][:top], scored.top_logprobs[entry][:top])
            entries = [(token_id, scored.logprobs[entry], scored.ranks[entry], self._token_text(token_id))]
            entries.extend((t, lp, rank, self._token_text(t)) for rank, (t, lp) in enumerate(alternatives, start=1))
            positions.append(openai.prompt_logprob_position(entries))
        return positions

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
            [None if top is None else dict(top) for top in choice.logprob_tops],
            choice.text_offsets,
        )


def _engine_prompt_logprobs(request: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Return how many alternatives the engine scores per prompt token, or None to score none.

    An echo with `logprobs` and vLLM's `prompt_logprobs` may both ask; the larger count serves both.
    """
    counts = [request.options.prompt_logprobs]
    if getattr(request, "echo", False):
        counts.append(request.options.logprobs)
    counts = [count for count in counts if count is not None]
    return max(counts) if counts else None


def _listed_prompt_logprobs(request: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Return the alternatives per token of vLLM's `prompt_logprobs` list, or None for no list.

    vLLM lists prompt logprobs whenever it computes them, so an echo with `logprobs` gets the
    list too, with that count, unless `prompt_logprobs` sets its own.
    """
    if request.options.prompt_logprobs is not None:
        return request.options.prompt_logprobs
    if getattr(request, "echo", False):
        return request.options.logprobs
    return None


def _passthrough_headers(http_request: web.Request) -> dict[str, str]:
    request_id = http_request.get("request_id")
    return {"x-request-id": request_id} if request_id else {}
