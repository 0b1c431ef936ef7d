"""llama.cpp reference worker for `benchmarks/engine.py`, run in its own virtualenv.

Usage: `python engine_llama_cpp.py MODEL.gguf THREADS MAX_BATCH`, then one command per line
on stdin, each answered by one JSON line on stdout:
- `prefill N`: tokens/s of one N-token prompt in one `llama_decode` call;
- `decode B STEPS`: tokens/s of B sequences (32-token prompts) decoding STEPS tokens each,
  all B in one `llama_decode` call per step, which is how llama.cpp's server batches
  concurrent requests.

The model stays loaded between commands so the caller can interleave them with its own
measurements. Token ids are fixed synthetic values, so the numbers do not depend on sampling.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp

DECODE_PROMPT_TOKENS = 32


class Worker:
    """One llama.cpp model and context with a batch large enough for every command."""

    def __init__(self, path: str, threads: int, max_batch: int, max_prompt: int = 1024):
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        # llama-cpp-python 0.3.36 built with GGML_NATIVE on an AMX-capable Xeon crashed
        # (SIGSEGV in llama_decode) with the AMX repacked weight buffers. The plain CPU
        # buffers run the same Q4_1 weights with AVX-512 kernels.
        model_params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max(4096, max_batch * 256)
        params.n_batch = max(max_prompt, max_batch * DECODE_PROMPT_TOKENS)
        params.n_ubatch = params.n_batch
        params.n_seq_max = max_batch
        # One KV buffer shared by all sequences; otherwise each sequence gets only n_ctx / n_seq_max.
        params.kv_unified = True
        params.n_threads = threads
        params.n_threads_batch = threads
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        self.memory = llama_cpp.llama_get_memory(self.context)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, max_batch)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Run (token, position, sequence, wants_logits) entries through one llama_decode call."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for index, (token, position, sequence, logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = logits
        if llama_cpp.llama_decode(self.context, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def prefill(self, count: int) -> float:
        llama_cpp.llama_memory_clear(self.memory, True)
        prompt = [100 + (index * 37) % 40000 for index in range(count)]
        start = time.perf_counter()
        self._decode([(token, position, 0, position == count - 1) for position, token in enumerate(prompt)])
        return count / (time.perf_counter() - start)

    def decode(self, size: int, steps: int) -> float:
        llama_cpp.llama_memory_clear(self.memory, True)
        last = DECODE_PROMPT_TOKENS - 1
        self._decode(
            [(200 + seq, pos, seq, pos == last) for seq in range(size) for pos in range(DECODE_PROMPT_TOKENS)]
        )
        start = time.perf_counter()
        for step in range(steps):
            self._decode([(300 + step, DECODE_PROMPT_TOKENS + step, seq, True) for seq in range(size)])
            for seq in range(size):
                llama_cpp.llama_get_logits_ith(self.context, seq)
        return size * steps / (time.perf_counter() - start)


def main() -> None:
    path, threads, max_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    worker = Worker(path, threads, max_batch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *arguments = line.split()
        if command == "prefill":
            result = worker.prefill(int(arguments[0]))
        elif command == "decode":
            result = worker.decode(int(arguments[0]), int(arguments[1]))
        elif command == "quit":
            break
        else:
            raise ValueError(f"unknown command {command!r}")
        print(json.dumps({"tokens_per_s": result}), flush=True)


if __name__ == "__main__":
    main()
