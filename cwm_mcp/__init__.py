"""cwm's MCP server (window tools over the connector's control socket); see issue 4."""
