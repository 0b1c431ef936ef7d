"""Benchmark the engine's native CPU kernels against the PyTorch ops they replace.

Usage: `python benchmarks/kernels.py [--threads N] [--rounds R]`

Loads the embedded SmolLM2-135M in bfloat16 once and times the model runner with the native
kernels switched off piece by piece, in one process and interleaved over `--rounds` rounds:
- native: every native kernel (few-row linears, fused norm and SiLU, decode and prefill
  attention);
- oneDNN linears: the same, but linears of every row count on oneDNN;
- PyTorch attention: the same as native, but decode attention on padded `bmm` and prefill
  attention on SDPA;
- PyTorch only: no native kernel.
Metrics: one-sequence decode step (ms), 32-sequence decode (tokens/s) and one 549-token
prefill (tokens/s). Each number is the best round. Prints a table and writes
`benchmarks/results/kernels.json`. Needs a CPU with AVX512-BF16 and a C compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import block_table, machine_description, synthetic_tokens  # noqa: E402

from llmisvc.engine.model_runner import ModelRunner, StepInput  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGURATIONS = ("native", "oneDNN linears", "PyTorch attention", "PyTorch only")


class Switches:
    """Switches for turning groups of native kernels off and on again on a loaded model."""

    def __init__(self, runner: ModelRunner):
        self.model = runner.model
        self.native = self.model.native
        self.linears = [layer[kind] for layer in self.model.layers for kind in ("qkv", "o", "gate_up", "down")]
        self.linears.append(self.model.lm_head)
        self.native_max_rows = self.linears[0].native_max_rows

    def apply(self, configuration: str) -> None:
        rows = 0 if configuration in ("oneDNN linears", "PyTorch only") else self.native_max_rows
        for linear in self.linears:
            linear.native_max_rows = rows
        self.model.native = None if configuration == "PyTorch only" else self.native
        if configuration == "PyTorch attention":
            # Instance attributes shadow the methods until they are removed from `__dict__`.
            self.native.decode_attention = lambda *args: None
            self.native.supports_attention = lambda query, keys: False
        else:
            self.native.__dict__.pop("decode_attention", None)
            self.native.__dict__.pop("supports_attention", None)


def decode_step_ms(runner: ModelRunner, steps: int = 24) -> float:
    """Return the mean time of one-token steps of one sequence after a 128-token prompt."""
    table = block_table(0, 128 + steps + 1, runner.block_size)
    runner.execute([StepInput("single", synthetic_tokens(128, seed=3), 0, table)])
    start = time.perf_counter()
    for step in range(steps):
        runner.execute([StepInput("single", [500 + step], 128 + step, table)])
    elapsed = time.perf_counter() - start
    runner.free_sequence("single")
    return elapsed / steps * 1e3


def batch_decode_tokens_per_s(runner: ModelRunner, batch: int = 32, steps: int = 8) -> float:
    """Return decode tokens/s of `batch` sequences stepped together after 128-token prompts."""
    size = -(-(128 + steps + 1) // runner.block_size)
    ids = [f"batch-{i}" for i in range(batch)]
    tables = [block_table(i * size, 128 + steps + 1, runner.block_size) for i in range(batch)]
    runner.execute([StepInput(ids[i], synthetic_tokens(128, seed=100 + i), 0, tables[i]) for i in range(batch)])
    start = time.perf_counter()
    for step in range(steps):
        runner.execute([StepInput(ids[i], [500 + step], 128 + step, tables[i]) for i in range(batch)])
    elapsed = time.perf_counter() - start
    for seq_id in ids:
        runner.free_sequence(seq_id)
    return batch * steps / elapsed


def prefill_tokens_per_s(runner: ModelRunner, tokens: int = 549) -> float:
    """Return tokens/s of one `tokens`-long prompt computed in one step."""
    table = block_table(0, tokens, runner.block_size)
    start = time.perf_counter()
    runner.execute([StepInput("prefill", synthetic_tokens(tokens, seed=1), 0, table)])
    elapsed = time.perf_counter() - start
    runner.free_sequence("prefill")
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="number of interleaved rounds, of which the best counts")
    args = parser.parse_args()

    runner = ModelRunner("smollm2", dtype="bfloat16", threads=args.threads, num_blocks=2048)
    if runner.model.native is None:
        sys.exit("native kernels are unavailable on this machine (see the engine log above)")
    switches = Switches(runner)
    machine = machine_description()
    results = {name: {"decode_batch_1_step_ms": [], "decode_batch_32_tokens_per_s": [], "prefill_549_tokens_per_s": []}
               for name in CONFIGURATIONS}
    with torch.inference_mode():
        for _round in range(args.rounds):
            for name in CONFIGURATIONS:
                switches.apply(name)
                results[name]["decode_batch_1_step_ms"].append(decode_step_ms(runner))
                results[name]["decode_batch_32_tokens_per_s"].append(batch_decode_tokens_per_s(runner))
                results[name]["prefill_549_tokens_per_s"].append(prefill_tokens_per_s(runner))
    switches.apply("native")

    best = {
        name: {key: (min(values) if key.endswith("_ms") else max(values)) for key, values in metrics.items()}
        for name, metrics in results.items()
    }
    print(f"\nnative kernel benchmark, {args.threads} threads, {machine['cpu']}")
    print(f"{'configuration':20s} {'decode b1 (ms/step)':>20s} {'decode b32 (tok/s)':>19s} {'prefill 549 (tok/s)':>20s}")
    for name, metrics in best.items():
        print(
            f"{name:20s} {metrics['decode_batch_1_step_ms']:20.2f} {metrics['decode_batch_32_tokens_per_s']:19.1f}"
            f" {metrics['prefill_549_tokens_per_s']:20.1f}"
        )

    machine["load_average_end"] = list(os.getloadavg())
    report = {
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "threads": args.threads,
        "rounds": args.rounds,
        "kernel_choice": runner.model.kernel_choice,
        "best": best,
        "samples": results,
    }
    output = REPO / "benchmarks" / "results" / "kernels.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
