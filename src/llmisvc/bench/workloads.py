"""Workloads of `llmisvc bench serve`: what each request sends and when it may be sent.

- `random`: unrelated prompts of `input_len` tokens.
- `prefix-repetition`: `num_prefixes` prefixes of `prefix_len` tokens, each request one of
  them (chosen at random) plus a random suffix of `input_len` tokens.
- `shared-prefix`: `num_groups` groups of `prompts_per_group` prompts. Each group shares a
  system prompt of `prefix_len` tokens, followed by a question of `input_len` tokens, and
  requests are shuffled across groups.
- `multi-turn`: `num_prompts` conversations of `turns` user turns. Each turn resends the
  conversation so far (system prompt, earlier questions and the model's replies), so it
  can only start after the previous turn's reply arrived.

Lengths are in tokens of about 4 characters (one short hex word plus a space), the
simulator's tokenization; real tokenizers give similar counts for such text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORKLOADS = ("random", "prefix-repetition", "shared-prefix", "multi-turn")


@dataclass
class BenchRequest:
    """One request to send: a prompt (completions) or messages (chat), and its output length.

    For multi-turn, `conversation` and `turn` identify the request and `questions`
    contains the later user turns still to send.
    """

    max_tokens: int
    prompt: str | None = None
    messages: list[dict] | None = None
    conversation: int | None = None
    turn: int = 0
    questions: list[str] = field(default_factory=list)


@dataclass
class WorkloadSpec:
    """Parameters of a workload (token counts are approximate, 4 characters each)."""

    name: str = "random"
    num_prompts: int = 100
    input_len: int = 256
    output_len: int = 128
    prefix_len: int = 1024
    num_prefixes: int = 8
    num_groups: int = 8
    prompts_per_group: int = 16
    turns: int = 4
    chat: bool = False
    seed: int = 0


def random_text(rng: random.Random, tokens: int) -> str:
    """Return text of about `tokens` tokens made of random 3-hex-digit words."""
    return "".join(f"{rng.randrange(4096):03x} " for _ in range(tokens))


def build(spec: WorkloadSpec) -> list[BenchRequest]:
    """Return the workload's initial requests (the first turns, for multi-turn), in send order.

    Raises ValueError for an unknown workload name.
    """
    rng = random.Random(spec.seed)
    if spec.name == "random":
        prompts = [random_text(rng, spec.input_len) for _ in range(spec.num_prompts)]
    elif spec.name == "prefix-repetition":
        prefixes = [random_text(rng, spec.prefix_len) for _ in range(spec.num_prefixes)]
        prompts = [rng.choice(prefixes) + random_text(rng, spec.input_len) for _ in range(spec.num_prompts)]
    elif spec.name == "shared-prefix":
        systems = [random_text(rng, spec.prefix_len) for _ in range(spec.num_groups)]
        order = [g for g in range(spec.num_groups) for _ in range(spec.prompts_per_group)]
        rng.shuffle(order)
        if spec.chat:
            return [
                BenchRequest(spec.output_len, messages=[{"role": "system", "content": systems[g]}, {"role": "user", "content": random_text(rng, spec.input_len)}])
                for g in order
            ]
        prompts = [systems[g] + random_text(rng, spec.input_len) for g in order]
    elif spec.name == "multi-turn":
        requests = []
        for conversation in range(spec.num_prompts):
            system = random_text(rng, spec.prefix_len)
            questions = [random_text(rng, spec.input_len) for _ in range(spec.turns)]
            messages = [{"role": "system", "content": system}, {"role": "user", "content": questions[0]}]
            requests.append(BenchRequest(spec.output_len, messages=messages, conversation=conversation, turn=0, questions=questions[1:]))
        return requests
    else:
        raise ValueError(f"unknown workload {spec.name!r}; expected one of {', '.join(WORKLOADS)}")

    if spec.chat:
        return [BenchRequest(spec.output_len, messages=[{"role": "user", "content": p}]) for p in prompts]
    return [BenchRequest(spec.output_len, prompt=p) for p in prompts]


def next_turn(request: BenchRequest, answer: str) -> BenchRequest | None:
    """Return the conversation's next turn after `answer`, or None when it is over."""
    if not request.questions:
        return None
    messages = [*request.messages, {"role": "assistant", "content": answer}, {"role": "user", "content": request.questions[0]}]
    return BenchRequest(request.max_tokens, messages=messages, conversation=request.conversation, turn=request.turn + 1, questions=request.questions[1:])
