"""Wire formats shared by engine, sim, scheduler and gateway.

OpenAI request and response shapes, kv_transfer_params, header names and metric names live here.
"""
