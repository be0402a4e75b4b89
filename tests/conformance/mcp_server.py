#!/usr/bin/env python3
"""An MCP server written with the official `mcp` package, for node/tests/it/mcp.rs.

    mcp_server.py                  serve over stdio (the node spawns it)
    mcp_server.py --http PORT      serve streamable HTTP on 127.0.0.1:PORT/mcp

Every call is appended as a JSON line to the file named by GAIA_MCP_LOG (when set), so the
test sees what the node really sent, and over which transport.
"""
import json
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

TRANSPORT = "http" if "--http" in sys.argv else "stdio"
server = MCPServer("gaia-test-mcp", version="1.0")


def record(tool, arguments):
    path = os.environ.get("GAIA_MCP_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": tool, "arguments": arguments, "transport": TRANSPORT}) + "\n")


@server.tool()
def get_weather(city: str) -> str:
    """Current weather of a city."""
    record("get_weather", {"city": city})
    return f"Weather in {city}: 21 C and a clear sky (reported by MCP over {TRANSPORT})"


@server.tool()
def broken(reason: str) -> str:
    """A tool that always fails."""
    record("broken", {"reason": reason})
    # An anticipated failure: its message reaches the client (`isError` with the text).
    raise ToolError("the station is offline")


@server.tool()
def flood(n: int) -> str:
    """Returns far too much text."""
    record("flood", {"n": n})
    return "x" * 200_000


@server.tool()
def hidden() -> str:
    """Left out of the node's allow-list."""
    record("hidden", {})
    return "should never run"


if __name__ == "__main__":
    if TRANSPORT == "http":
        port = int(sys.argv[sys.argv.index("--http") + 1])
        server.run("streamable-http", host="127.0.0.1", port=port)
    else:
        server.run()
