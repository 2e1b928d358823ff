"""``posebatch serve``: the original body-analysis HTTP API, self-hosted, on the batch engine.

auth (keys, tokens, rate limits) -> batcher (dynamic batching on the engine) -> app (routes)
-> server (wires them from settings and runs uvicorn).
"""
