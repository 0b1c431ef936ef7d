"""HTTP front door: OpenAI endpoints, streaming proxy, prefill/decode orchestration, admission.

One gateway per machine serves every local service.
"""
