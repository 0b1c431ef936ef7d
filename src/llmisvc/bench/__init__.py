"""Load generator and report for OpenAI-compatible endpoints.

Output keys follow vLLM's benchmark JSON so existing tooling reads it.
"""
