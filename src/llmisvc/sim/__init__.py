"""Simulated engine with the engine's HTTP surface and a latency and KV-cache model.

Used for routing tests and benchmarks at a scale no real model fits on one machine.
"""
