"""ModelRunner: weights, tokenizer and KV storage behind one `execute()` call per engine step.

The engine core decides what runs: which sequences, which chunk of each prompt, which block
ids. The runner turns that into one batched forward pass and returns next-token logits, and
for entries that ask, the raw logprobs of prompt tokens scored by rows inside their chunk.
Block ids belong to the core: block `i` of a sequence's `block_table` holds the K/V of
positions `[i * block_size, (i + 1) * block_size)`. Blocks covering positions before a new
sequence's `start_pos` are treated as already computed (prefix-cache hits or imported KV).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from llmisvc.engine.kv_cache import KVCache, KVLayout
from llmisvc.engine.loader import load_model, parse_dtype
from llmisvc.engine.models.llama import AttentionBatch, LlamaModel, PrefillSegment
from llmisvc.engine.sampler import PromptLogprobs, score_tokens

logger = logging.getLogger(__name__)

# Default KV pool budget when neither num_blocks nor kv_cache_memory is given: this
# fraction of physical memory on CPU (capped), or of free device memory on CUDA.
DEFAULT_CPU_KV_FRACTION = 0.1
DEFAULT_CPU_KV_CAP_BYTES = 4 << 30
DEFAULT_CUDA_KV_FRACTION = 0.5
# Prompt-logprob rows are scored in batches whose float32 logits take at most this many
# bytes (341 rows at vocabulary 49,152), however long the step. The log-softmax and rank
# comparison of a batch take about twice that again while it is scored.
PROMPT_LOGPROBS_CHUNK_BYTES = 64 << 20


@dataclass
class PromptLogprobsRequest:
    """Prompt rows of one `StepInput` whose next-token logprobs are requested.

    Row `i` is position `first_pos + i` and scores `target_ids[i]`, the prompt token at
    position `first_pos + i + 1`. Every row lies inside the entry's chunk. Each row also
    returns its `top_k` most likely tokens (0: none).
    """

    first_pos: int
    target_ids: list[int]
    top_k: int


@dataclass
class StepInput:
    """One sequence's share of an engine step.

    `token_ids` are the tokens to compute now, at positions `start_pos ..`; `block_table`
    lists the sequence's block ids covering at least `start_pos + len(token_ids)` positions.
    `prompt_logprobs` asks for the raw logprobs of tokens scored by rows of this chunk.
    """

    seq_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int] = field(default_factory=list)
    prompt_logprobs: PromptLogprobsRequest | None = None


@dataclass
class StepOutput:
    """Result of `ModelRunner.execute_step`.

    `logits` is what `execute` returns. `prompt_logprobs` maps the `seq_id` of each input
    with a `PromptLogprobsRequest` to the logprobs of its `target_ids`, in order.
    """

    logits: torch.Tensor
    prompt_logprobs: dict[str, PromptLogprobs]


@dataclass
class _SequenceState:
    slot: int
    num_computed: int
    block_table: list[int]
    num_stored_blocks: int


class ModelRunner:
    """Load a model and run batched forward steps over the engine core's sequences.

    Args:
        model_uri: see `engine.loader` for accepted forms.
        dtype: "bfloat16" (default), "float32", "float16" or "auto".
        device: "cpu", "cuda", "cuda:N" or a `torch.device`. NOTE: the tests cover CPU only,
            because no GPU was available. The CUDA path uses the same tensor ops but is unrun.
        block_size: tokens per KV block.
        num_blocks: KV pool size in blocks; None sizes it from `kv_cache_memory`.
        max_model_len: context length cap in tokens; None uses the model's.
        threads: torch intra-op threads; None keeps torch's default.
        kv_cache_memory: KV pool budget in bytes when `num_blocks` is None. The default is
            10% of physical memory capped at 4 GiB on CPU, and half the free device memory
            after loading weights on CUDA. The per-sequence working slots are extra: about
            `running sequences x longest length x bytes per token`.

    Raises `ModelLoadError` subclasses when the model cannot be loaded.
    """

    def __init__(
        self,
        model_uri: str,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        block_size: int = 16,
        num_blocks: int | None = None,
        max_model_len: int | None = None,
        threads: int | None = None,
        kv_cache_memory: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        loaded = load_model(model_uri, self.dtype)
        self.model_path = loaded.path
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model = LlamaModel(loaded.config, loaded.weights, self.dtype, self.device)

        self.max_model_len = min(max_model_len or self.config.max_model_len, self.config.max_model_len)
        self.config.max_model_len = self.max_model_len
        self.block_size = block_size
        layout = KVLayout(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim)
        self.num_blocks = num_blocks or self._default_num_blocks(layout, kv_cache_memory)
        self.kv = KVCache(layout, block_size, self.num_blocks, self.dtype, self.device)
        self._sequences: dict[str, _SequenceState] = {}
        logger.info(
            "model runner ready: %s (%s) dtype=%s device=%s blocks=%d x %d tokens, max_model_len=%d, threads=%d",
            model_uri,
            self.model_path,
            str(self.dtype).removeprefix("torch."),
            self.device,
            self.num_blocks,
            block_size,
            self.max_model_len,
            torch.get_num_threads(),
        )

    def _default_num_blocks(self, layout: KVLayout, budget: int | None) -> int:
        if budget is None:
            if self.device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(self.device)
                budget = int(free * DEFAULT_CUDA_KV_FRACTION)
            else:
                physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                budget = min(int(physical * DEFAULT_CPU_KV_FRACTION), DEFAULT_CPU_KV_CAP_BYTES)
        block_bytes = layout.bytes_per_token(self.dtype) * self.block_size
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ValueError(f"KV cache memory {budget} bytes is smaller than one block ({block_bytes} bytes)")
        return int(num_blocks)

    # -- stepping -------------------------------------------------------------------------

    def execute(self, inputs: list[StepInput]) -> torch.Tensor:
        """Run one forward step and return float32 logits `[len(inputs), vocab]` on the CPU.

        Row `i` contains the next-token logits after the last token of `inputs[i]`. Raises
        `ValueError`, changing nothing, for a sequence listed twice, an empty entry, a
        `start_pos` beyond what the sequence has computed, a length over `max_model_len`, a
        block table too short for the positions, or prompt-logprob rows outside the chunk.
        """
        return self.execute_step(inputs).logits

    def execute_step(self, inputs: list[StepInput]) -> StepOutput:
        """Run one forward step like `execute` and also score the requested prompt tokens."""
        if not inputs:
            raise ValueError("execute() needs at least one StepInput")
        # The output is allocated outside inference mode, so it is an ordinary tensor that
        # callers (samplers) may modify in place, without copying the logits a second time.
        with torch.no_grad():
            logits = torch.empty((len(inputs), self.config.vocab_size), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            hidden, last_rows = self._execute(inputs, logits)
            prompt_logprobs = self._score_prompt_rows(inputs, last_rows, hidden)
        return StepOutput(logits.cpu() if logits.device.type != "cpu" else logits, prompt_logprobs)

    def _execute(self, inputs: list[StepInput], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Run the forward pass; return the final hidden states and each input's last batch row."""
        # Validate every entry before admitting any, so a rejected step changes nothing.
        if len({entry.seq_id for entry in inputs}) != len(inputs):
            raise ValueError("execute() got the same seq_id twice in one step")
        for entry in inputs:
            self._validate(entry)
        states = [self._prepare(entry) for entry in inputs]

        # Single-token entries go first as one padded decode batch, ordered by slot so that
        # consecutive slots become one view of the working buffer.
        decode_order = sorted(
            (i for i, entry in enumerate(inputs) if len(entry.token_ids) == 1), key=lambda i: states[i].slot
        )
        prefill_order = [i for i, entry in enumerate(inputs) if len(entry.token_ids) > 1]
        prefill_set = set(prefill_order)
        order = decode_order + prefill_order

        token_ids: list[int] = []
        positions: list[int] = []
        logit_rows = [0] * len(inputs)
        prefills: list[PrefillSegment] = []
        for i in order:
            entry = inputs[i]
            row = len(token_ids)
            token_ids.extend(entry.token_ids)
            positions.extend(range(entry.start_pos, entry.start_pos + len(entry.token_ids)))
            logit_rows[i] = len(token_ids) - 1
            if i in prefill_set:
                prefills.append(PrefillSegment(row, len(entry.token_ids), states[i].slot, entry.start_pos))

        batch = self._attention_batch(decode_order, inputs, states, prefills)
        device = self.device
        hidden = self.model.forward(
            torch.tensor(token_ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            batch,
            self.kv,
            torch.tensor(logit_rows, dtype=torch.long, device=device),
            logits,
        )

        for entry, state in zip(inputs, states):
            self._finish_step(entry, state)
        return hidden, logit_rows

    def _score_prompt_rows(
        self, inputs: list[StepInput], last_rows: list[int], hidden: torch.Tensor
    ) -> dict[str, PromptLogprobs]:
        """Score the prompt tokens `inputs` ask for, from the step's final hidden states.

        Rows of every requesting input are gathered into one batch and go through the LM
        head and log-softmax `PROMPT_LOGPROBS_CHUNK_BYTES` at a time, so the `[tokens, vocab]`
        logits of a long prompt never exist all at once.
        """
        requesting = [(i, entry.prompt_logprobs) for i, entry in enumerate(inputs) if entry.prompt_logprobs is not None]
        if not requesting:
            return {}

        rows: list[int] = []
        targets: list[int] = []
        for i, request in requesting:
            entry = inputs[i]
            first_row = last_rows[i] - len(entry.token_ids) + 1 + (request.first_pos - entry.start_pos)
            rows.extend(range(first_row, first_row + len(request.target_ids)))
            targets.extend(request.target_ids)
        top_k = max(request.top_k for _, request in requesting)
        row_tensor = torch.tensor(rows, dtype=torch.long, device=self.device)
        target_tensor = torch.tensor(targets, dtype=torch.long, device=self.device)

        rows_per_chunk = max(1, PROMPT_LOGPROBS_CHUNK_BYTES // (4 * self.config.vocab_size))
        pieces = []
        for begin in range(0, len(rows), rows_per_chunk):
            end = begin + rows_per_chunk
            logits = self.model.logits(hidden.index_select(0, row_tensor[begin:end]))
            pieces.append(score_tokens(logits, target_tensor[begin:end], top_k))
        logprobs, ranks, top_logprobs, top_ids = [], [], [], []
        if pieces:
            logprobs, ranks, top_logprobs, top_ids = (torch.cat(parts).tolist() for parts in zip(*pieces))

        results = {}
        begin = 0
        for i, request in requesting:
            end = begin + len(request.target_ids)
            keep = request.top_k
            results[inputs[i].seq_id] = PromptLogprobs(
                logprobs[begin:end],
                ranks[begin:end],
                [ids[:keep] for ids in top_ids[begin:end]],
                [values[:keep] for values in top_logprobs[begin:end]],
            )
            begin = end
        return results

    def _validate(self, entry: StepInput) -> None:
        count = len(entry.token_ids)
        end = entry.start_pos + count
        if count == 0:
            raise ValueError(f"sequence {entry.seq_id!r}: empty token_ids")
        if end > self.max_model_len:
            raise ValueError(f"sequence {entry.seq_id!r}: {end} tokens exceed max_model_len {self.max_model_len}")
        if len(entry.block_table) * self.block_size < end:
            raise ValueError(
                f"sequence {entry.seq_id!r}: block table of {len(entry.block_table)} blocks cannot hold {end} positions"
            )
        scored = entry.prompt_logprobs
        if scored is not None:
            if not entry.start_pos <= scored.first_pos or scored.first_pos + len(scored.target_ids) > end:
                raise ValueError(
                    f"sequence {entry.seq_id!r}: prompt-logprob rows {scored.first_pos}.."
                    f"{scored.first_pos + len(scored.target_ids)} lie outside positions {entry.start_pos}..{end}"
                )
            if scored.top_k < 0:
                raise ValueError(f"sequence {entry.seq_id!r}: prompt-logprob top_k {scored.top_k} is negative")
        state = self._sequences.get(entry.seq_id)
        if state is not None and entry.start_pos > state.num_computed:
            raise ValueError(
                f"sequence {entry.seq_id!r}: start_pos {entry.start_pos} skips past {state.num_computed} computed tokens"
            )

    def _prepare(self, entry: StepInput) -> _SequenceState:
        """Admit a new sequence (loading its cached prefix) or rewind a known one to `start_pos`."""
        end = entry.start_pos + len(entry.token_ids)
        state = self._sequences.get(entry.seq_id)
        if state is None:
            slot = self.kv.add_sequence(entry.seq_id)
            state = _SequenceState(slot, 0, list(entry.block_table), entry.start_pos // self.block_size)
            self._sequences[entry.seq_id] = state
            self.kv.load_prefix(slot, entry.block_table, entry.start_pos)
            state.num_computed = entry.start_pos
        else:
            # start_pos below num_computed rewinds: later positions are recomputed.
            state.num_computed = entry.start_pos
            state.num_stored_blocks = min(state.num_stored_blocks, entry.start_pos // self.block_size)
        state.block_table = list(entry.block_table)
        self.kv.ensure_capacity(end)
        state.slot = self.kv.slot(entry.seq_id)
        return state

    def _attention_batch(
        self,
        decode_order: list[int],
        inputs: list[StepInput],
        states: list[_SequenceState],
        prefills: list[PrefillSegment],
    ) -> AttentionBatch:
        if not decode_order:
            return AttentionBatch(0, None, None, None, prefills)
        slots = [states[i].slot for i in decode_order]
        positions = [inputs[i].start_pos for i in decode_order]
        count = len(slots)
        consecutive = slots == list(range(slots[0], slots[0] + count))
        return AttentionBatch(
            num_decode=count,
            decode_slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            decode_positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            decode_slot_range=(slots[0], slots[0] + count) if consecutive else None,
            prefills=prefills,
        )

    def _finish_step(self, entry: StepInput, state: _SequenceState) -> None:
        """Advance the sequence and copy each newly filled block to the pool."""
        state.num_computed = entry.start_pos + len(entry.token_ids)
        self.kv.set_length(state.slot, state.num_computed)
        full_blocks = state.num_computed // self.block_size
        for block_index in range(state.num_stored_blocks, full_blocks):
            self.kv.store_block(state.slot, block_index, state.block_table[block_index])
        state.num_stored_blocks = max(state.num_stored_blocks, full_blocks)

    # -- sequence lifecycle and transfer --------------------------------------------------

    @torch.inference_mode()
    def free_sequence(self, seq_id: str) -> None:
        """Release a finished or preempted sequence's working slot.

        Its partial last block is first copied to the pool, so blocks the core keeps (a
        finished prefill waiting for KV transfer) hold every computed position. Unknown ids
        are ignored, because the core frees requests that never reached a step.
        """
        state = self._sequences.pop(seq_id, None)
        if state is None:
            return
        slot = self.kv.slot(seq_id)
        tail = state.num_computed - state.num_stored_blocks * self.block_size
        if tail > 0 and state.num_stored_blocks < len(state.block_table):
            self.kv.store_block(slot, state.num_stored_blocks, state.block_table[state.num_stored_blocks], tail)
        self.kv.remove_sequence(seq_id)
        # Removing a slot moves the last sequence into it; refresh the cached slot indices.
        for other_id, other in self._sequences.items():
            other.slot = self.kv.slot(other_id)

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Return a CPU copy of pool blocks, `[n, layers, 2, block_size, kv_heads, head_dim]`."""
        with torch.inference_mode():
            blocks = self.kv.export_blocks(block_ids).cpu()
        # Cloning outside inference mode yields an ordinary tensor the caller may modify.
        return blocks.clone()

    @torch.inference_mode()
    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Write blocks received by KV transfer into the pool (the layout `export_blocks` returns)."""
        self.kv.import_blocks(block_ids, blocks)

    @property
    def num_running(self) -> int:
        """Number of sequences holding a working slot."""
        return len(self._sequences)
