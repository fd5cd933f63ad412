"""Helpers shared by the protocol tests."""

from __future__ import annotations

import httpx


def multipart(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related response: (headers, content)."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = next(
        p.split("=", 1)[1].strip('"')
        for p in content_type.split(";")
        if p.strip().startswith("boundary")
    ).encode()
    body = response.content
    delimiter = b"--" + boundary
    assert body.startswith(delimiter + b"\r\n")
    chunks = body[len(delimiter) + 2 :].split(b"\r\n" + delimiter)
    assert chunks.pop() == b"--\r\n", "the close delimiter ends the message"
    parts = []
    for number, chunk in enumerate(chunks):
        if number:
            assert chunk.startswith(b"\r\n")
            chunk = chunk[2:]
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts
