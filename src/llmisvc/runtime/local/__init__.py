"""Local runtime: supervised engine and gateway processes on this machine.

State lives in an embedded SQLite store under LLMISVC_HOME so apply is declarative.
"""
