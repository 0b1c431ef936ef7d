"""Model architectures: forward passes written against the engine's KV cache."""
