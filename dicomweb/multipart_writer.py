"""Writing ``multipart/related`` response bodies (RFC 2387, RFC 2046 5.1.1).

DICOMweb answers retrieve transactions with one part per instance, frame or
bulk data value (PS3.18 8.6.1.2).  These helpers only frame the parts; the
caller yields each part's content in chunks between :func:`part_head` and
:func:`close_delimiter`, so a response never has to be held in memory::

    boundary = new_boundary()
    yield part_head(boundary, {"Content-Type": "application/dicom"}, first=True)
    yield from chunks
    yield close_delimiter(boundary)

The reader of request bodies lives in :mod:`dicomweb.multipart`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping


def new_boundary() -> str:
    """A fresh boundary: 32 random hex digits, which no DICOM content is
    expected to contain after a CRLF and two dashes."""
    return uuid.uuid4().hex


def content_type(boundary: str, part_type: str) -> str:
    """The ``Content-Type`` of the whole message.

    Parameters
    ----------
    boundary
        The boundary the parts are framed with.
    part_type
        The media type of the parts (the ``type`` parameter of RFC 2387
        3.1), e.g. ``application/dicom``.
    """
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def part_head(boundary: str, headers: Mapping[str, str], *, first: bool) -> bytes:
    """The delimiter and header block that open a part.

    Parameters
    ----------
    boundary
        The message's boundary.
    headers
        The part's header fields (ASCII), e.g. ``Content-Type`` and
        ``Content-Location``.
    first
        True for the first part; later parts start with the CRLF that ends
        the previous part's content (RFC 2046 5.1.1: the CRLF before a
        delimiter belongs to the delimiter).
    """
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    lead = "" if first else "\r\n"
    return f"{lead}--{boundary}\r\n{lines}\r\n".encode("ascii")


def close_delimiter(boundary: str, *, empty: bool = False) -> bytes:
    """The close delimiter that ends the message.

    Parameters
    ----------
    boundary
        The message's boundary.
    empty
        True if no part was written (no CRLF of a previous part to end).
    """
    lead = "" if empty else "\r\n"
    return f"{lead}--{boundary}--\r\n".encode("ascii")
