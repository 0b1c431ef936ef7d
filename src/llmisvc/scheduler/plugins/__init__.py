"""Scheduler plugins, one per module; each module docstring gives its type name, parameters and formula."""
