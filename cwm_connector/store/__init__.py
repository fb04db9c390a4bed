"""Where blocks live: the blob format, one module per tier (`memory`, `disk`,
`redis`), the `tiered` store in front of them, the SQLite `catalog` (with
`catalog_db` opening the file) and the start-up `check`.

May import: `cwm_connector.errors` and `stats` only; never `engine/`,
`windows/` or `control/`.
"""
