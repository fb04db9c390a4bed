"""The window ops behind the control socket: `service` (one object holding the
ops and the op-name table), `records` (reading and writing window rows),
`core` (freeze, thaw, list, status, clone, delete), `admin` (sessions, health,
metrics, auto-freeze), `transfer` and `export_file` (export/import), `share`
(Redis sharing), `args` and `query` (argument checks, list filters).

May import: `store/`, `engine/` (fingerprints, hash chains, sessions),
`control/` (the worker channel), `errors`, `stats`.
"""
