"""Kubernetes runtime: KServe-shaped manifests and the operator that reconciles them.

Rendering is pure; the operator applies what rendering returns.
"""
