"""Batched next-token sampling from logits, with OpenAI's and vLLM's sampling parameters.

One call handles a whole step. Penalties, logit bias and min-tokens masking are tensor
operations over `[batch, vocab]`, and temperature, top-k, top-p and min-p are applied
row-wise with broadcast parameters. Random rows draw by inverse CDF: one uniform number
per row is located in the row's cumulative distribution. A row whose request has a `seed`
draws that number from its own `torch.Generator`, so its output does not depend on what
else is in the batch. Logprobs are those of the model's raw distribution (before penalties and
temperature), as vLLM returns by default. `score_tokens` computes the same raw logprobs for
given tokens, which the model runner uses for prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmisvc.protocol.openai import SamplingOptions

# Temperatures below this are treated as greedy decoding.
_GREEDY_TEMPERATURE = 1e-5
# Floor of scored logprobs, because JSON has no -inf. vLLM's OpenAI server reports -9999.0.
MIN_LOGPROB = -9999.0


@dataclass
class SamplingRow:
    """One sequence's sampling inputs.

    `token_ids` is the prompt followed by the generated tokens. It is only sliced when a
    penalty needs it, so building rows costs nothing per token. `generator` is the request's
    own generator when it has a seed, else None (the shared generator is used).
    `eos_token_ids` are masked while fewer than `min_tokens` are generated.
    """

    options: SamplingOptions
    token_ids: list[int]
    num_prompt_tokens: int
    generator: torch.Generator | None
    eos_token_ids: list[int]

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt's tokens."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """How many tokens were generated."""
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SamplerOutput:
    """Sampled tokens and, when requested, their logprobs.

    `logprobs[i]` is the raw logprob of `token_ids[i]`; `top_ids[i]` / `top_logprobs[i]` list
    the row's `options.logprobs` most likely tokens (empty lists for rows without logprobs).
    """

    token_ids: list[int]
    logprobs: list[float] | None
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


@dataclass
class PromptLogprobs:
    """Raw logprobs of consecutive prompt tokens, one entry per token.

    `logprobs[i]` is the token's logprob and `ranks[i]` its rank in the vocabulary, 1 for
    the most likely token. Tied tokens share the larger rank, as in vLLM. `top_ids[i]` and
    `top_logprobs[i]` list the most likely tokens at that position, best first.
    """

    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.logprobs)

    def extend(self, other: "PromptLogprobs") -> None:
        """Append the entries of `other`, which scores the tokens after these."""
        self.logprobs.extend(other.logprobs)
        self.ranks.extend(other.ranks)
        self.top_ids.extend(other.top_ids)
        self.top_logprobs.extend(other.top_logprobs)


def score_tokens(
    logits: torch.Tensor, token_ids: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the raw logprobs, vocabulary ranks and top-k alternatives of `token_ids` under `logits`.

    `logits` is `[rows, vocab]` in any float dtype (computed in float32) and `token_ids`
    `[rows]`. Returns `(logprobs [rows], ranks [rows], top_logprobs [rows, top_k],
    top_ids [rows, top_k])`, with logprobs floored at MIN_LOGPROB.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs >= chosen).sum(dim=-1)
    top_values, top_ids = logprobs.topk(top_k, dim=-1)
    return chosen.squeeze(1).clamp_min(MIN_LOGPROB), ranks, top_values.clamp_min(MIN_LOGPROB), top_ids


class Sampler:
    """Sample one token per row; `seed` initialises the generator shared by unseeded requests."""

    def __init__(self, seed: int | None = None):
        self._generator = torch.Generator()
        if seed is not None:
            self._generator.manual_seed(seed)
        else:
            self._generator.seed()

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Return one token per row of `logits` (`[batch, vocab]`, float32)."""
        logits = logits.float()
        want_logprobs = any(row.options.logprobs is not None for row in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        logits = self._apply_penalties(logits, rows)
        logits = _apply_logit_bias(logits, rows)
        logits = _mask_eos_before_min_tokens(logits, rows)
        token_ids = self._choose(logits, rows)

        if raw_logprobs is None:
            return SamplerOutput(token_ids.tolist(), None, None, None)
        return _gather_logprobs(raw_logprobs, token_ids, rows)

    # -- logit processing -------------------------------------------------------------------

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Apply repetition, frequency and presence penalties where any row sets one."""
        options = [row.options for row in rows]
        needs_counts = any(o.frequency_penalty or o.presence_penalty for o in options)
        needs_repetition = any(o.repetition_penalty != 1.0 for o in options)
        if not needs_counts and not needs_repetition:
            return logits

        batch, vocab = logits.shape
        output_counts = _token_counts([row.output_token_ids for row in rows], batch, vocab)
        if needs_repetition:
            penalty = torch.tensor([o.repetition_penalty for o in options]).unsqueeze(1)
            prompt_counts = _token_counts([row.prompt_token_ids for row in rows], batch, vocab)
            seen = (prompt_counts + output_counts) > 0
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalised, logits)
        if needs_counts:
            frequency = torch.tensor([o.frequency_penalty for o in options]).unsqueeze(1)
            presence = torch.tensor([o.presence_penalty for o in options]).unsqueeze(1)
            logits = logits - frequency * output_counts - presence * (output_counts > 0).float()
        return logits

    # -- choosing ----------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Return the chosen token id of each row: argmax for greedy rows, a draw otherwise."""
        temperatures = torch.tensor([row.options.temperature for row in rows])
        greedy = temperatures < _GREEDY_TEMPERATURE
        if bool(greedy.all()):
            return logits.argmax(dim=-1)

        chosen = torch.zeros(len(rows), dtype=torch.long)
        if bool(greedy.any()):
            greedy_index = greedy.nonzero().squeeze(1)
            chosen[greedy_index] = logits[greedy_index].argmax(dim=-1)

        random_index = (~greedy).nonzero().squeeze(1)
        random_rows = [rows[i] for i in random_index.tolist()]
        scaled = logits[random_index] / temperatures[random_index].unsqueeze(1)
        probs = _filtered_probs(scaled, [row.options for row in random_rows])

        # Inverse-CDF sampling needs one uniform number per row, so a seeded row costs one
        # draw from its own generator instead of a vocabulary-sized noise tensor.
        uniform = torch.empty(len(random_rows), dtype=torch.float64)
        shared = [i for i, row in enumerate(random_rows) if row.generator is None]
        if shared:
            uniform[shared] = torch.rand(len(shared), generator=self._generator, dtype=torch.float64)
        for i, row in enumerate(random_rows):
            if row.generator is not None:
                uniform[i] = torch.rand(1, generator=row.generator, dtype=torch.float64)
        cdf = probs.double().cumsum(dim=-1)
        # Scaling by the row total absorbs rounding; right=True skips zero-probability tokens.
        targets = (uniform * cdf[:, -1]).unsqueeze(1)
        drawn = torch.searchsorted(cdf, targets, right=True).squeeze(1)
        chosen[random_index] = drawn.clamp_(max=probs.shape[1] - 1)
        return chosen


def _token_counts(token_lists: list[list[int]], batch: int, vocab: int) -> torch.Tensor:
    """Return `[batch, vocab]` float counts of each token id per row."""
    counts = torch.zeros(batch, vocab)
    longest = max((len(tokens) for tokens in token_lists), default=0)
    if longest == 0:
        return counts
    # Pad with an extra column index `vocab` that is cut off afterwards.
    padded = torch.full((batch, longest), vocab, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        if tokens:
            padded[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    wide = torch.zeros(batch, vocab + 1)
    wide.scatter_add_(1, padded, torch.ones(batch, longest))
    counts = wide[:, :vocab]
    return counts


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    row_index, col_index, values = [], [], []
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        for token_id, bias in row.options.logit_bias.items():
            if 0 <= token_id < vocab:
                row_index.append(i)
                col_index.append(token_id)
                values.append(bias)
    if not values:
        return logits
    logits = logits.clone()
    logits.index_put_((torch.tensor(row_index), torch.tensor(col_index)), torch.tensor(values), accumulate=True)
    return logits


def _mask_eos_before_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    row_index, col_index = [], []
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        if row.num_output_tokens < row.options.min_tokens:
            for token_id in (*row.eos_token_ids, *row.options.stop_token_ids):
                if 0 <= token_id < vocab:
                    row_index.append(i)
                    col_index.append(token_id)
    if not row_index:
        return logits
    logits = logits.clone()
    logits[torch.tensor(row_index), torch.tensor(col_index)] = float("-inf")
    return logits


def _filtered_probs(logits: torch.Tensor, options: list[SamplingOptions]) -> torch.Tensor:
    """Return probabilities after top-k, top-p and min-p filtering (rows renormalised)."""
    vocab = logits.shape[1]
    top_k = torch.tensor([o.top_k if 0 < o.top_k < vocab else vocab for o in options])
    top_p = torch.tensor([o.top_p for o in options])
    min_p = torch.tensor([o.min_p for o in options])

    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        positions = torch.arange(vocab).unsqueeze(0)
        remove = positions >= top_k.unsqueeze(1)
        sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        cumulative = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= cumulative >= top_p.unsqueeze(1)
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)

    probs = torch.softmax(logits, dim=-1)
    if bool((min_p > 0).any()):
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _gather_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    max_top = max(row.options.logprobs or 0 for row in rows)
    top_ids: list[list[int]] = [[] for _ in rows]
    top_values: list[list[float]] = [[] for _ in rows]
    if max_top > 0:
        values, ids = raw_logprobs.topk(max_top, dim=-1)
        values_list, ids_list = values.tolist(), ids.tolist()
        for i, row in enumerate(rows):
            count = row.options.logprobs or 0
            top_ids[i] = ids_list[i][:count]
            top_values[i] = values_list[i][:count]
    return SamplerOutput(token_ids.tolist(), chosen.tolist(), top_ids, top_values)
