"""The first-run demo (`make demo`, `cwm demo`) and its helpers: `tiny_model`
(a random-weight model and a BPE tokenizer, no download) and `vllm_process`
(starts and stops a real vLLM OpenAI server). Used by the tests and benchmarks
too; never imported by the connector's hot path.

May import: `control/` (the client) and `errors`.
"""
