"""Where blocks live: the blob format, one module per tier (`memory`, `disk`,
`redis` with `redis_pipe`/`redis_bulk`/`redis_lua`/`redis_breaker`/`redis_upkeep`), the `tiered`
store in front of them, the SQLite `catalog` (with `catalog_db` opening the file,
`catalog_windows` the window rows and listing SQL, `wal_checkpoint`), the disk
budget (`eviction`, the policy; `budget`, applying it), the start-up `check` and the
offline upkeep (`upkeep`: du, gc, verify).

May import: `cwm_connector.errors` and `stats` only; never `engine/`,
`windows/` or `control/`.
"""
