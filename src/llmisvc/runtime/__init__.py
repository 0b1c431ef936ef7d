"""Runtimes that carry out a controller plan.

local supervises processes on this machine; kubernetes renders and reconciles cluster objects.
"""
