"""The HTTP listener: /metrics and /healthz (admin pages and /unsubscribe join it later).

A threaded stdlib WSGI server: the traffic is scrapes and a few admin clicks, and a thread keeps it off
the SMTP event loop.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST

from relay import metrics

log = logging.getLogger(__name__)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        log.debug("http %s", format % args)


class HttpApp:
    """WSGI application. ``health`` returns None when healthy, else the reason."""

    def __init__(self, depth: Callable[[], dict], health: Callable[[], str | None], mounts=()):
        self.depth = depth
        self.health = health
        self.mounts = list(mounts)  # WSGI apps with .matches(path): /unsubscribe, /admin

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        for app in self.mounts:
            if app.matches(path):
                return app(environ, start_response)
        if path == "/metrics":
            body = metrics.exposition(self.depth)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            reason = self.health()
            status = "200 OK" if reason is None else "503 Service Unavailable"
            body = json.dumps({"status": "ok" if reason is None else "unhealthy", "reason": reason})
            start_response(status, [("Content-Type", "application/json")])
            return [body.encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpServer:
    def __init__(self, host: str, port: int, app: HttpApp):
        server_class = _Server6 if ":" in host else _Server
        self.server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="relay-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
