"""The control plane: the wire `protocol` (length-prefixed msgpack frames), the
Unix-socket `server`, the `client` (used by the CLI and the MCP server) and the
`worker_channel` (the scheduler's private line to each worker).

May import: `cwm_connector.errors` only; never `engine/`, `store/` or `windows/`.
"""
