"""The reranker engine one arm replica runs: prepare on CPU, forward on the device.

Imports torch, transformers and PIL only (never the serving layer, Ray or HTTP): `prepare`
turns one request into token ids, positions and pixel patches and is the only place an input
error can arise; `forward` scores prepared requests in batches, computing each request's
shared prefix (system turn, instruction, query) once.
"""
