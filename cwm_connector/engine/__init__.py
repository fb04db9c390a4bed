"""What runs inside vLLM's processes.

Scheduler side (EngineCore): `plans` (what crosses to the workers), `scheduler`
(hits, stages, loads, captures; never imports torch), `hit_run` and `kv_groups`
(hit rules per KV-cache group), `sessions`, `auto_freeze`, `fingerprint`,
`hash_chain`, `prom`, `vllm_compat` (the vLLM names cwm imports, guarded).
Worker side: `worker`, `group_workers` (one worker per KV-cache group), `loads`,
`layer_loads`, `kv_layout` and `staging` (host buffers), and the copy backends
`gpu_copy`, `triton_copy`, `native_ext`.

May import: `cwm_connector.config`, `errors`, `stats`, and `store/`. Never
`windows/` or `control/` (the facade `connector.py` wires those in).
"""
