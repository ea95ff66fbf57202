"""Benchmarks: `rerank-fleet bench engine|serving|backends|reliability`. A top layer beside cli,
placement and loadtest: it uses the engine, workshop and the serving layer; no layer below imports it."""
