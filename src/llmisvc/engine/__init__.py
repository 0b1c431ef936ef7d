"""Built-in model server: paged KV cache with prefix caching, continuous batching, OpenAI API.

Runs Llama and Qwen2 models on CPU (the embedded default model) and on CUDA.
"""
