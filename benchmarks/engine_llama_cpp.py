"""llama.cpp reference measurements for `benchmarks/engine.py`, run in its own virtualenv.

Usage: `python engine_llama_cpp.py MODEL.gguf THREADS PROMPT_TOKENS DECODE_TOKENS BATCHES`
(BATCHES comma-separated). Prints one JSON object: prefill tokens/s for one prompt of
PROMPT_TOKENS tokens and decode tokens/s for each batch size. Uses the low-level
`llama_cpp` bindings (llama_decode on a llama_batch with one sequence id per stream), which
is how llama.cpp's own server batches concurrent requests. Token ids are fixed synthetic
values, so the numbers are independent of sampling.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp


def _fill(batch, entries) -> None:
    """Put (token, position, sequence, wants_logits) entries into a llama_batch."""
    batch.n_tokens = len(entries)
    for index, (token, position, sequence, logits) in enumerate(entries):
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence
        batch.logits[index] = logits


def main() -> None:
    path, threads, prompt_tokens, decode_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    batch_sizes = [int(size) for size in sys.argv[5].split(",")]
    max_batch = max(batch_sizes)

    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    # llama-cpp-python 0.3.36 built with GGML_NATIVE on an AMX-capable Xeon crashed
    # (SIGSEGV in llama_decode) with the AMX repacked weight buffers. The plain CPU buffers
    # run the same Q4_1 weights with AVX-512 kernels.
    model_params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = max(4096, max_batch * 256)
    params.n_batch = max(prompt_tokens, max_batch * 32)
    params.n_ubatch = params.n_batch
    params.n_seq_max = max_batch
    # One KV buffer shared by all sequences; otherwise each sequence gets only n_ctx / n_seq_max.
    params.kv_unified = True
    params.n_threads = threads
    params.n_threads_batch = threads
    context = llama_cpp.llama_init_from_model(model, params)
    memory = llama_cpp.llama_get_memory(context)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, max_batch)
    results: dict[str, float] = {}

    # Prefill: one prompt in one llama_decode call, logits for the last token only.
    prompt = [100 + (index * 37) % 40000 for index in range(prompt_tokens)]
    for _ in range(2):  # first run warms up
        llama_cpp.llama_memory_clear(memory, True)
        _fill(batch, [(token, position, 0, position == prompt_tokens - 1) for position, token in enumerate(prompt)])
        start = time.perf_counter()
        if llama_cpp.llama_decode(context, batch) != 0:
            raise RuntimeError("llama_decode failed during prefill")
        elapsed = time.perf_counter() - start
    results["prefill_tokens_per_s"] = prompt_tokens / elapsed

    # Decode: `size` sequences with a 32-token prompt each, then DECODE_TOKENS steps of one
    # token per sequence, all sequences in one llama_decode call per step.
    for size in batch_sizes:
        llama_cpp.llama_memory_clear(memory, True)
        entries = [(200 + sequence, position, sequence, position == 31) for sequence in range(size) for position in range(32)]
        _fill(batch, entries)
        llama_cpp.llama_decode(context, batch)
        start = time.perf_counter()
        for step in range(decode_tokens):
            _fill(batch, [(300 + step, 32 + step, sequence, True) for sequence in range(size)])
            if llama_cpp.llama_decode(context, batch) != 0:
                raise RuntimeError("llama_decode failed during decode")
            for sequence in range(size):
                llama_cpp.llama_get_logits_ith(context, sequence)
        elapsed = time.perf_counter() - start
        results[f"decode_tokens_per_s_batch_{size}"] = size * decode_tokens / elapsed

    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(context)
    llama_cpp.llama_model_free(model)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
