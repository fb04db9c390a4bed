"""`python -m cwm_mcp`: run the cwm MCP server (stdio by default, `--http PORT` for HTTP)."""

import sys

from cwm_mcp.server import main

if __name__ == "__main__":
    sys.exit(main())
