"""Sampler on synthetic logits: greedy, filters, penalties, bias, seeds and logprobs."""

import math

import pytest
import torch

from llmisvc.engine.sampler import MIN_LOGPROB, Sampler, SamplingRow, score_tokens
from llmisvc.protocol.openai import SamplingOptions

VOCAB = 8
EOS = 7


def row(output=(), prompt=(), seed=None, **options) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingOptions(**options), [*prompt, *output], len(prompt), generator, [EOS])


def logits(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_picks_argmax():
    result = Sampler(0).sample(logits([0, 1, 5, 2, 0, 0, 0, 0], [9, 1, 0, 0, 0, 0, 0, 0]), [row(temperature=0)] * 2)
    assert result.token_ids == [2, 0]
    assert result.logprobs is None


def test_top_k_one_is_greedy_at_any_temperature():
    sampler = Sampler(0)
    values = logits([0, 3, 2, 1, 0, 0, 0, 0])
    for _ in range(20):
        assert sampler.sample(values, [row(temperature=5.0, top_k=1)]).token_ids == [1]


def test_top_p_keeps_only_the_nucleus():
    sampler = Sampler(0)
    # Token 0 has about 0.88 of the mass, so top_p 0.5 leaves only it.
    values = logits([4, 2, 0, 0, 0, 0, 0, 0])
    drawn = {sampler.sample(values, [row(top_p=0.5)]).token_ids[0] for _ in range(50)}
    assert drawn == {0}


def test_min_p_drops_unlikely_tokens():
    sampler = Sampler(0)
    values = logits([3, 3, 0, 0, 0, 0, 0, 0])
    drawn = {sampler.sample(values, [row(min_p=0.5)]).token_ids[0] for _ in range(50)}
    assert drawn == {0, 1}


def test_random_draws_follow_the_distribution():
    sampler = Sampler(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    values = torch.log(probs.clamp_min(1e-12)).unsqueeze(0).repeat(2000, 1)
    counts = torch.bincount(torch.tensor(sampler.sample(values, [row()] * 2000).token_ids), minlength=VOCAB)
    assert abs(counts[0].item() / 2000 - 0.5) < 0.05
    assert abs(counts[1].item() / 2000 - 0.3) < 0.05
    assert counts[3:].sum().item() == 0


def test_seeded_rows_ignore_batch_neighbours():
    values = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    alone = [Sampler(1).sample(values, [row(seed=seed)]).token_ids[0] for seed in range(20)]
    crowd = [Sampler(2).sample(values.repeat(3, 1), [row(), row(seed=seed), row()]).token_ids[1] for seed in range(20)]
    assert alone == crowd


def test_seeded_sequences_repeat():
    values = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))

    def draw():
        generator_row = row(seed=7, temperature=1.5)
        sampler = Sampler(None)
        return [sampler.sample(values, [generator_row]).token_ids[0] for _ in range(10)]

    assert draw() == draw()


def test_logit_bias_forces_a_token():
    result = Sampler(0).sample(logits([5, 0, 0, 0, 0, 0, 0, 0]), [row(temperature=0, logit_bias={3: 100.0})])
    assert result.token_ids == [3]


def test_min_tokens_masks_eos_and_stop_ids():
    values = logits([0, 0, 0, 0, 0, 9, 0, 10])
    early = Sampler(0).sample(values, [row(output=[1], temperature=0, min_tokens=2, stop_token_ids=[5])])
    assert early.token_ids == [0]
    late = Sampler(0).sample(values, [row(output=[1, 2], temperature=0, min_tokens=2, stop_token_ids=[5])])
    assert late.token_ids == [EOS]


def test_repetition_penalty_demotes_seen_tokens():
    values = logits([0, 2.0, 1.5, 0, 0, 0, 0, 0])
    plain = Sampler(0).sample(values, [row(temperature=0)])
    penalised = Sampler(0).sample(values, [row(prompt=[1], temperature=0, repetition_penalty=2.0)])
    assert plain.token_ids == [1]
    assert penalised.token_ids == [2]


def test_frequency_and_presence_penalties():
    values = logits([0, 2.0, 1.5, 0, 0, 0, 0, 0])
    frequency = Sampler(0).sample(values, [row(output=[1, 1], temperature=0, frequency_penalty=0.3)])
    assert frequency.token_ids == [2]
    presence = Sampler(0).sample(values, [row(output=[1], temperature=0, presence_penalty=0.6)])
    assert presence.token_ids == [2]
    mixed = Sampler(0).sample(values.repeat(2, 1), [row(output=[1], temperature=0, presence_penalty=0.6), row(temperature=0)])
    assert mixed.token_ids == [2, 1]


def test_logprobs_are_raw_and_sorted():
    values = logits([2.0, 1.0, 0, 0, 0, 0, 0, 0])
    result = Sampler(0).sample(values, [row(temperature=0, logprobs=2, presence_penalty=1.5, output=[0])])
    raw = torch.log_softmax(values[0], dim=-1)
    assert result.token_ids == [1]
    assert math.isclose(result.logprobs[0], raw[1].item(), rel_tol=1e-6)
    assert result.top_ids[0] == [0, 1]
    assert math.isclose(result.top_logprobs[0][0], raw[0].item(), rel_tol=1e-6)


def test_logprobs_only_for_rows_that_ask():
    values = logits([2.0, 1.0, 0, 0, 0, 0, 0, 0], [0, 1.0, 2.0, 0, 0, 0, 0, 0])
    result = Sampler(0).sample(values, [row(temperature=0, logprobs=0), row(temperature=0)])
    assert result.top_ids == [[], []]
    assert len(result.logprobs) == 2


def test_score_tokens_ranks_and_top_k():
    values = logits([0, 3, 2, 1, 0, 0, 0, 0], [5, 5, 0, 0, 0, 0, 0, 0])
    logprobs, ranks, top_values, top_ids = score_tokens(values, torch.tensor([2, 1]), 2)
    reference = torch.log_softmax(values, dim=-1)
    assert logprobs.tolist() == pytest.approx([reference[0, 2].item(), reference[1, 1].item()])
    # Rank counts tokens at least as likely, so the tie in row 1 shares rank 2.
    assert ranks.tolist() == [2, 2]
    assert top_ids[0].tolist() == [1, 2]
    assert top_values[0].tolist() == pytest.approx(reference[0, [1, 2]].tolist())


def test_score_tokens_floors_impossible_tokens():
    values = logits([0, float("-inf"), 0, 0, 0, 0, 0, 0])
    logprobs, ranks, _, top_ids = score_tokens(values, torch.tensor([1]), 0)
    assert logprobs.tolist() == [MIN_LOGPROB]
    assert ranks.tolist() == [VOCAB]
    assert top_ids.shape == (1, 0)
