"""Latency model of the simulated engine.

Time to first token = `ttft_overhead` + uncached prompt tokens x `prefill_per_token`
(or transferred tokens x `transfer_per_token` when the KV comes from a prefill engine).
Prefills of one engine run one after another, because a real engine's prefill is
compute-bound and shares the accelerator. A request that arrives during another prefill
waits for it. Inter-token latency grows linearly with the number of running sequences:
`itl` at batch size 1 up to `itl` x `itl_max_factor` at `max_num_seqs`.
All times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyModel:
    """Parameters of the simulated engine's timing, in seconds."""

    ttft_overhead: float = 0.02
    prefill_per_token: float = 0.0002
    itl: float = 0.01
    itl_max_factor: float = 3.0
    transfer_per_token: float = 0.00002

    def prefill_time(self, uncached_tokens: int) -> float:
        """Return the compute time of a prefill over `uncached_tokens` tokens."""
        return self.ttft_overhead + max(uncached_tokens, 0) * self.prefill_per_token

    def transfer_time(self, transferred_tokens: int) -> float:
        """Return the time to pull `transferred_tokens` tokens of KV from a prefill engine."""
        return self.ttft_overhead + max(transferred_tokens, 0) * self.transfer_per_token

    def inter_token_latency(self, running: int, max_num_seqs: int) -> float:
        """Return the time between two output tokens with `running` sequences in the batch."""
        if max_num_seqs <= 1:
            return self.itl
        fraction = min(max(running - 1, 0), max_num_seqs - 1) / (max_num_seqs - 1)
        return self.itl * (1.0 + (self.itl_max_factor - 1.0) * fraction)

    @property
    def is_instant(self) -> bool:
        """True when every delay is zero (echo mode without latency flags)."""
        return self.ttft_overhead == 0 and self.prefill_per_token == 0 and self.itl == 0 and self.transfer_per_token == 0
