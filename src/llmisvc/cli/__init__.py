"""The llmisvc command line: one console script with kubectl-style subcommands.

Each subcommand lives in the module of the component it drives.
"""
