"""The daemon's admin interface: a JSON-lines Unix socket (mode 0600; optional token-protected TCP),
a blocking client, and the `cachemgr admin` CLI that renders results with rich.

Module map: protocol (wire format, argument schemas) · commands (what each command does to the daemon)
· server (sockets, limits, access) · client · cli (argparse, exit codes) · render / tree_view (rich).
"""

from __future__ import annotations

from cachemgr.admin.client import AdminClient, AdminUnavailable
from cachemgr.admin.protocol import AdminError, ErrorCode
from cachemgr.admin.server import AdminServer

__all__ = ["AdminClient", "AdminError", "AdminServer", "AdminUnavailable", "ErrorCode"]
