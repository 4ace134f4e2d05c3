"""A loopback HTTP server for a folder of product images (local runs stand in for a CDN)."""

from __future__ import annotations

import functools
import http.server
import logging

log = logging.getLogger(__name__)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        log.debug("image server: " + format, *args)


def make_server(directory: str, host: str = "127.0.0.1", port: int = 8765) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server for ``directory``; call ``serve_forever()`` on it."""
    handler = functools.partial(_QuietHandler, directory=directory)
    return http.server.ThreadingHTTPServer((host, port), handler)
