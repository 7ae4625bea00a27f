"""A plain HTTP client for the server tests (the standard library's http.client: a real client over a real socket),
multipart bodies, and a free port on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlencode, urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, method: str = "GET", body: bytes | None = None, content_type: str | None = None,
            query: dict[str, Any] | None = None, timeout: float = 300) -> tuple[int, Any, dict[str, str]]:
    """(status, JSON answer (or the text when not JSON), headers) of one request."""
    parts = urlsplit(url)
    path = parts.path + ("?" + urlencode(query) if query else "")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw.decode("utf-8", "replace")
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def multipart(fields: dict[str, tuple[str, bytes, str]], boundary: str = "mrcnn-test-boundary") -> tuple[bytes, str]:
    """multipart/form-data body of {name: (filename, data, content type)} and its Content-Type header."""
    chunks = []
    for name, (filename, data, kind) in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
