"""Benchmark the built-in engine against transformers and llama.cpp on the embedded model.

Usage: `python benchmarks/engine.py [--threads N] [--rounds R] [--decode-tokens N]`

Measures, in bfloat16 on the embedded SmolLM2-135M GGUF:
- the model runner: prefill and decode tokens/s at batch 1, 4, 16 and 32, and the prefill of
  one 549-token prompt;
- the engine core (`LLMEngine`, continuous batching): output tokens/s of 32 concurrent
  requests, and time to first token of a request whose 500-token prefix is cached versus
  the same request cold;
- Hugging Face `transformers` (`generate()`, same dequantised weights in bfloat16): prefill
  of the 549-token prompt and single-sequence decode;
- llama.cpp through `llama-cpp-python` on the same GGUF file: prefill and batched decode.

All systems run in one invocation with the same thread count, interleaved over `--rounds`
rounds. Each number is the best round, because other processes on a shared machine only
ever slow a round down. The llama.cpp reference lives in its own virtualenv under
`~/.cache/llmisvc-bench/` (created on first use; building llama-cpp-python from source takes
15-20 minutes on 2 cores). Prints a table and writes `benchmarks/results/engine.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from llmisvc.engine.loader import embedded_gguf_path
from llmisvc.engine.model_runner import ModelRunner, StepInput

REPO = Path(__file__).resolve().parent.parent
BENCH_HOME = Path.home() / ".cache" / "llmisvc-bench"
LLAMA_CPP_VENV = BENCH_HOME / "venv-llamacpp"
BATCH_SIZES = (1, 4, 16, 32)
LONG_PROMPT_TOKENS = 549
BATCH_PROMPT_TOKENS = 128
DECODE_PROMPT_TOKENS = 32
PREFIX_TOKENS = 500
CONCURRENT_REQUESTS = 32

# Targets for the embedded model, as ratios measured side by side.
TARGETS = {
    "continuous_batching_32_vs_llama_cpp_batched": 1.2,
    "prefill_549_vs_llama_cpp": 4.0,
    "single_decode_vs_transformers": 2.0,
    "single_decode_vs_llama_cpp": 0.5,
}
PREFIX_TTFT_TARGET = 0.25


def synthetic_tokens(count: int, seed: int) -> list[int]:
    """Return `count` ordinary token ids (above the special tokens), fixed for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (count,), generator=generator).tolist()


def block_table(first: int, positions: int, block_size: int) -> list[int]:
    return list(range(first, first + -(-positions // block_size)))


# -- built-in engine: model runner ------------------------------------------------------


def runner_prefill_long(runner: ModelRunner) -> float:
    """Return tokens/s of one 549-token prompt computed in one step."""
    prompt = synthetic_tokens(LONG_PROMPT_TOKENS, seed=1)
    start = time.perf_counter()
    runner.execute([StepInput("long", prompt, 0, block_table(0, LONG_PROMPT_TOKENS, runner.block_size))])
    elapsed = time.perf_counter() - start
    runner.free_sequence("long")
    return LONG_PROMPT_TOKENS / elapsed


def runner_batch(runner: ModelRunner, batch: int, decode_tokens: int) -> tuple[float, float]:
    """Return (prefill, decode) tokens/s of `batch` sequences stepped together.

    The prefill step computes `batch` prompts of 128 tokens at once; each decode step then
    computes one token of every sequence. No scheduling or sampling is included.
    """
    size = runner.block_size
    blocks_per_seq = -(-(BATCH_PROMPT_TOKENS + decode_tokens + 1) // size)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    tables = [block_table(i * blocks_per_seq, BATCH_PROMPT_TOKENS + decode_tokens, size) for i in range(batch)]
    prompts = [synthetic_tokens(BATCH_PROMPT_TOKENS, seed=100 + i) for i in range(batch)]

    start = time.perf_counter()
    runner.execute([StepInput(ids[i], prompts[i], 0, tables[i]) for i in range(batch)])
    prefill = batch * BATCH_PROMPT_TOKENS / (time.perf_counter() - start)

    start = time.perf_counter()
    for step in range(decode_tokens):
        position = BATCH_PROMPT_TOKENS + step
        runner.execute([StepInput(ids[i], [500 + step], position, tables[i]) for i in range(batch)])
    decode = batch * decode_tokens / (time.perf_counter() - start)

    for seq_id in ids:
        runner.free_sequence(seq_id)
    return prefill, decode


# -- built-in engine: engine core -------------------------------------------------------


def measure_engine_core(runner: ModelRunner, decode_tokens: int) -> dict[str, float]:
    """Return continuous-batching throughput and cached-prefix TTFT through `LLMEngine`."""
    from llmisvc.engine.llm_engine import EngineConfig, LLMEngine
    from llmisvc.engine.sequence import EngineRequest
    from llmisvc.protocol.openai import SamplingOptions

    async def run_one(engine, request_id: str, prompt: list[int], max_tokens: int) -> tuple[float, float, float, int]:
        options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = EngineRequest(request_id=request_id, prompt_token_ids=prompt, options=options, max_tokens=max_tokens)
        submitted = time.perf_counter()
        first = None
        count = 0
        async for output in engine.generate([request]):
            tokens = sum(len(delta.token_ids) for delta in output.deltas)
            if tokens and first is None:
                first = time.perf_counter()
            count += tokens
        return submitted, first, time.perf_counter(), count

    async def main() -> dict[str, float]:
        engine = LLMEngine(runner, EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048, enable_prefix_caching=True))
        engine.start(asyncio.get_running_loop())
        try:
            results: dict[str, float] = {}
            prompts = [synthetic_tokens(DECODE_PROMPT_TOKENS, seed=1000 + i) for i in range(CONCURRENT_REQUESTS)]
            runs = await asyncio.gather(
                *(run_one(engine, f"cb-{i}", prompt, decode_tokens) for i, prompt in enumerate(prompts))
            )
            # Steady decode window: from the moment every request has its first token until
            # the last finishes, the batch contains all 32 sequences.
            all_started = max(first for _submitted, first, _end, _count in runs)
            finished = max(end for _submitted, _first, end, _count in runs)
            total = sum(count for *_rest, count in runs)
            began = min(submitted for submitted, *_rest in runs)
            results["continuous_batching_32_output_tokens_per_s"] = total / (finished - began)
            results["continuous_batching_32_decode_tokens_per_s"] = (
                CONCURRENT_REQUESTS * (decode_tokens - 1) / (finished - all_started)
            )

            prefix = synthetic_tokens(PREFIX_TOKENS, seed=7)
            cold = await run_one(engine, "prefix-cold", prefix + synthetic_tokens(12, seed=8), 1)
            warm = await run_one(engine, "prefix-warm", prefix + synthetic_tokens(12, seed=9), 1)
            results["prefix_cold_ttft_s"] = cold[1] - cold[0]
            results["prefix_warm_ttft_s"] = warm[1] - warm[0]
            return results
        finally:
            engine.shutdown()

    return asyncio.run(main())


# -- transformers ----------------------------------------------------------------------


def load_transformers_model():
    """Return a transformers LlamaForCausalLM with the GGUF's weights in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(embedded_gguf_path())
    settings = load_gguf_checkpoint(path, return_tensors=False)["config"]
    settings.pop("_model_name_or_path", None)
    config = LlamaConfig(**settings)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = LlamaForCausalLM(config)
    model.load_state_dict({name: torch.as_tensor(value) for name, value in tensors.items()}, strict=False)
    model.tie_weights()
    return model.to(torch.bfloat16).eval()


def transformers_prefill(model) -> float:
    """Return transformers' tokens/s for one forward pass over the 549-token prompt."""
    with torch.inference_mode():
        prompt = torch.tensor([synthetic_tokens(LONG_PROMPT_TOKENS, seed=1)])
        start = time.perf_counter()
        model(prompt)
        return LONG_PROMPT_TOKENS / (time.perf_counter() - start)


def transformers_decode(model, decode_tokens: int) -> float:
    """Return transformers' single-sequence greedy decode tokens/s through `generate()`."""
    short = torch.tensor([synthetic_tokens(DECODE_PROMPT_TOKENS, seed=2)])
    mask = torch.ones_like(short)

    def generate(count: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                short, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=2
            )
        return time.perf_counter() - start

    # generate(n) includes the prompt's prefill; subtracting generate(1) leaves n-1 decodes.
    return decode_tokens / (generate(decode_tokens + 1) - generate(1))


# -- llama.cpp -------------------------------------------------------------------------


def ensure_llama_cpp(install: bool) -> Path | None:
    """Return the Python of the llama.cpp virtualenv, creating it when `install` is set."""
    python = LLAMA_CPP_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    if not install:
        return None
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    print(f"building llama-cpp-python into {LLAMA_CPP_VENV} (15-20 minutes on 2 cores)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LLAMA_CPP_VENV)], check=True)
    environment = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
    subprocess.run([python, "-m", "pip", "install", "llama-cpp-python"], check=True, env=environment)
    return python


class LlamaCppReference:
    """A `engine_llama_cpp.py` worker process that keeps the model loaded between commands."""

    def __init__(self, python: Path, threads: int):
        script = REPO / "benchmarks" / "engine_llama_cpp.py"
        command = [str(python), str(script), str(embedded_gguf_path()), str(threads), str(max(BATCH_SIZES))]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._read()  # the worker's ready line

    def _read(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited with {self._process.wait()}")
        return json.loads(line)

    def _ask(self, command: str) -> float:
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return self._read()["tokens_per_s"]

    def prefill(self, tokens: int) -> float:
        return self._ask(f"prefill {tokens}")

    def decode(self, batch: int, steps: int) -> float:
        return self._ask(f"decode {batch} {steps}")

    def close(self) -> None:
        self._process.stdin.write("quit\n")
        self._process.stdin.close()
        self._process.wait(timeout=60)


# -- report ----------------------------------------------------------------------------


def best_of(samples: dict[str, list[float]]) -> dict[str, float]:
    """Return each metric's best sample (highest rate, lowest time)."""
    merged: dict[str, float] = {}
    for key, values in samples.items():
        lower_is_better = key.endswith("_s") and not key.endswith("per_s")
        merged[key] = min(values) if lower_is_better else max(values)
    return merged


def machine_description() -> dict[str, object]:
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "logical_cpus": os.cpu_count(), "load_average_start": os.getloadavg()}


def compute_ratios(ours: dict, engine_core: dict, hf: dict, llama: dict) -> dict[str, float]:
    ratios: dict[str, float] = {}
    if llama:
        ratios["prefill_549_vs_llama_cpp"] = ours["prefill_549_tokens_per_s"] / llama["prefill_tokens_per_s"]
        ratios["single_decode_vs_llama_cpp"] = ours["decode_batch_1_tokens_per_s"] / llama["decode_tokens_per_s_batch_1"]
        for size in BATCH_SIZES:
            ratios[f"runner_decode_batch_{size}_vs_llama_cpp"] = (
                ours[f"decode_batch_{size}_tokens_per_s"] / llama[f"decode_tokens_per_s_batch_{size}"]
            )
        if engine_core:
            ratios["continuous_batching_32_vs_llama_cpp_batched"] = (
                engine_core["continuous_batching_32_decode_tokens_per_s"] / llama["decode_tokens_per_s_batch_32"]
            )
    if hf:
        ratios["prefill_549_vs_transformers"] = ours["prefill_549_tokens_per_s"] / hf["prefill_549_tokens_per_s"]
        ratios["single_decode_vs_transformers"] = ours["decode_batch_1_tokens_per_s"] / hf["decode_batch_1_tokens_per_s"]
    if engine_core:
        ratios["prefix_warm_vs_cold_ttft"] = engine_core["prefix_warm_ttft_s"] / engine_core["prefix_cold_ttft_s"]
    return ratios


def print_report(report: dict) -> None:
    ours, hf, llama, core = report["runner"], report["transformers"], report["llama_cpp"], report["engine_core"]
    print(f"\nengine benchmark, {report['threads']} threads, {report['machine']['cpu']}")
    print(f"{'metric':40s} {'llmisvc':>10s} {'transformers':>13s} {'llama.cpp':>10s}")
    print(
        f"{'prefill 549 tokens (tok/s)':40s} {ours['prefill_549_tokens_per_s']:10.1f} "
        f"{hf.get('prefill_549_tokens_per_s', float('nan')):13.1f} {llama.get('prefill_tokens_per_s', float('nan')):10.1f}"
    )
    for size in BATCH_SIZES:
        hf_value = hf.get("decode_batch_1_tokens_per_s", float("nan")) if size == 1 else float("nan")
        print(
            f"{f'decode batch {size} (tok/s)':40s} {ours[f'decode_batch_{size}_tokens_per_s']:10.1f} "
            f"{hf_value:13.1f} {llama.get(f'decode_tokens_per_s_batch_{size}', float('nan')):10.1f}"
        )
    for size in BATCH_SIZES:
        print(f"{f'prefill batch {size} x {BATCH_PROMPT_TOKENS} (tok/s)':40s} {ours[f'prefill_batch_{size}_tokens_per_s']:10.1f}")
    for key, value in core.items():
        print(f"{'engine core ' + key:40s} {value:10.3f}")
    print("\nratios (target)")
    for key, value in report["ratios"].items():
        target = TARGETS.get(key)
        if key == "prefix_warm_vs_cold_ttft":
            verdict = "met" if value <= PREFIX_TTFT_TARGET else "missed"
            print(f"  {key:48s} {value:7.3f}  (<= {PREFIX_TTFT_TARGET}: {verdict})")
        elif target is not None:
            print(f"  {key:48s} {value:7.2f}  (>= {target}: {'met' if value >= target else 'missed'})")
        else:
            print(f"  {key:48s} {value:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every system (default: all CPUs)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round counts (default 3)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps per measurement (default 32)")
    parser.add_argument("--no-install", action="store_true", help="skip llama.cpp if its virtualenv is missing")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "engine.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    machine = machine_description()
    llama_python = ensure_llama_cpp(install=not args.no_install)
    llama = LlamaCppReference(llama_python, args.threads) if llama_python is not None else None
    runner = ModelRunner("smollm2", dtype="bfloat16", threads=args.threads, num_blocks=4096)
    hf_model = load_transformers_model()

    # Each metric is measured for every system back to back, round after round, so that
    # load from other processes affects the systems of one comparison alike.
    samples: dict[str, dict[str, list[float]]] = {"runner": {}, "engine_core": {}, "transformers": {}, "llama_cpp": {}}

    def record(system: str, key: str, value: float) -> None:
        samples[system].setdefault(key, []).append(value)

    for index in range(args.rounds):
        print(f"round {index + 1}/{args.rounds}", flush=True)
        record("runner", "prefill_549_tokens_per_s", runner_prefill_long(runner))
        if llama is not None:
            record("llama_cpp", "prefill_tokens_per_s", llama.prefill(LONG_PROMPT_TOKENS))
        record("transformers", "prefill_549_tokens_per_s", transformers_prefill(hf_model))

        for size in BATCH_SIZES:
            prefill, decode = runner_batch(runner, size, args.decode_tokens)
            record("runner", f"prefill_batch_{size}_tokens_per_s", prefill)
            record("runner", f"decode_batch_{size}_tokens_per_s", decode)
            if llama is not None:
                record("llama_cpp", f"decode_tokens_per_s_batch_{size}", llama.decode(size, args.decode_tokens))
            if size == 1:
                record("transformers", "decode_batch_1_tokens_per_s", transformers_decode(hf_model, args.decode_tokens))

        for key, value in measure_engine_core(runner, args.decode_tokens).items():
            record("engine_core", key, value)
        if llama is not None:
            # A second batch-32 sample right after the continuous-batching run it is compared with.
            record("llama_cpp", "decode_tokens_per_s_batch_32", llama.decode(32, args.decode_tokens))
    if llama is not None:
        llama.close()

    machine["load_average_end"] = os.getloadavg()
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "threads": args.threads,
        "dtype": "bfloat16",
        "model": str(embedded_gguf_path().name),
        "decode_tokens": args.decode_tokens,
        "rounds": args.rounds,
        **{name: best_of(values) for name, values in samples.items()},
        "samples": samples,
    }
    report["ratios"] = compute_ratios(report["runner"], report["engine_core"], report["transformers"], report["llama_cpp"])
    report["targets"] = {**TARGETS, "prefix_warm_vs_cold_ttft": PREFIX_TTFT_TARGET}
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
