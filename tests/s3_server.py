"""A real S3-compatible HTTP server on loopback for the cloud tests, with injectable faults.

moto's S3 backend (``moto[s3]``) behind werkzeug's threaded WSGI server, as ``moto_server``
runs it, on ``127.0.0.1`` and a free port. Clients reach it through the environment of
:meth:`S3Server.environ` (``AWS_ENDPOINT_URL``, fake credentials, a region), which botocore,
s3fs and every subprocess the tests start (training under torchrun) read. :meth:`S3Server.failing`
makes the server answer chosen requests with an S3 error (``500 InternalError``, which clients
retry before giving up, as in an outage; ``403 AccessDenied``, which they do not): the fault sits
between our code and the store, nothing of ours is patched.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

ERRORS = {"InternalError": "500 Internal Server Error", "AccessDenied": "403 Forbidden"}


class QuietHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's line per request on stderr."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class FaultInjector:
    """WSGI middleware: a request whose method and path match an armed rule gets that rule's S3
    error (and is recorded in :attr:`refused`); the others go to the wrapped app."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.rules: list[tuple[str, re.Pattern, str]] = []
        self.refused: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self.lock:
            codes = [c for m, p, c in self.rules if m == method and p.search(path)]
            if codes:
                self.refused.append(f"{method} {path}")
        if not codes:
            return self.app(environ, start_response)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{codes[0]}</Code><Message>injected by the test server</Message></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        start_response(ERRORS[codes[0]], headers)
        return [body]


class S3Server:
    """moto's S3 on ``127.0.0.1:<free port>`` in a daemon thread of this process."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self.server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self.faults, threaded=True, request_handler=QuietHandler
        )
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> S3Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def environ(self) -> dict[str, str]:
        """What a client process needs to reach this server as ``s3://`` (botocore reads
        ``AWS_ENDPOINT_URL``; the credentials are moto's fakes)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",  # no profile of the machine applies
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "NO_PROXY": "127.0.0.1,localhost",
        }

    @contextmanager
    def failing(
        self, method: str, pattern: str, code: str = "InternalError"
    ) -> Iterator[list[str]]:
        """While the block runs, answer ``method`` requests whose path matches the regular
        expression ``pattern`` with the S3 error ``code`` (a key of ``ERRORS``); yields the
        list of refused requests."""
        rule = (method, re.compile(pattern), code)
        with self.faults.lock:
            self.faults.rules.append(rule)
            self.faults.refused.clear()
        try:
            yield self.faults.refused
        finally:
            with self.faults.lock:
                self.faults.rules.remove(rule)
