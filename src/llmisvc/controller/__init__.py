"""Controller: turns a merged spec into a plan, hands it to a runtime, derives status.

Runtime-agnostic; engine- and machine-dependent checks run in the planning step.
"""
