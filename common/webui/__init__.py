"""leukfed's browser pages: a read-only HTTP server (`server.py`) and the packaged HTML, JS and CSS (`static/`).

The coordinator's dashboard (`leukfed.server.dashboard`) and the hospital's console
(`leukfed.client.console`) are each one `WebApp`: a page plus the JSON documents it polls. Nothing is
fetched from elsewhere: the charts are SVG drawn by `static/common.js`.
"""
from __future__ import annotations

from leukfed.common.webui.server import ReadOnlyServer, WebApp, allowed_host, is_loopback, parse_listen

__all__ = ["ReadOnlyServer", "WebApp", "allowed_host", "is_loopback", "parse_listen"]
