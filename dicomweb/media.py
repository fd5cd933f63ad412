"""Media types of DICOMweb messages (PS3.18 8.7) and the DICOM JSON response.

:func:`parse_media_type` reads a ``Content-Type`` value (RFC 9110 8.3.1:
``type "/" subtype *( OWS ";" OWS parameter )``) into a :class:`MediaType`.
It is lenient where DICOMweb clients are known to be sloppy: a parameter
value may be a quoted string or a bare value that contains a ``/`` (the
``type=application/dicom`` of many examples, which is not a token in the
strict grammar).  Type, subtype and parameter names are case-insensitive
and kept in lower case; parameter values are kept as sent (a multipart
boundary is case-sensitive, RFC 2046 5.1.1).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping

from flask import Response
from pydicom.dataset import Dataset

#: PS3.18 8.7.3.5.1: a DICOM Part 10 instance.
APPLICATION_DICOM = "application/dicom"
#: PS3.18 8.7.3.5.3 / Annex F: the DICOM JSON model.
APPLICATION_DICOM_JSON = "application/dicom+json"
#: PS3.18 8.7.3.5.2 / PS3.19 Native DICOM Model as XML.
APPLICATION_DICOM_XML = "application/dicom+xml"
#: RFC 2387: the multipart payload of DICOMweb (PS3.18 8.6.1.2).
MULTIPART_RELATED = "multipart/related"
#: Plain JSON, which PS3.18 8.7.3.5.3 lets a user agent accept for DICOM JSON.
APPLICATION_JSON = "application/json"

#: RFC 9110 5.6.2 token characters.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_WS = " \t"


class MediaTypeError(ValueError):
    """A media type value that does not follow RFC 9110 8.3.1."""


@dataclasses.dataclass(frozen=True)
class MediaType:
    """A parsed media type.

    Attributes
    ----------
    essence
        ``type/subtype`` in lower case, e.g. ``multipart/related``.
    params
        Parameter values by lower-case name, unquoted.
    """

    essence: str
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def param(self, name: str) -> str | None:
        """The value of the parameter *name* (case-insensitive), or None."""
        return self.params.get(name.lower())

    def is_(self, essence: str) -> bool:
        """True if this is the media type *essence* (``type/subtype``),
        whatever the parameters."""
        return self.essence == essence.lower()

    def __str__(self) -> str:
        params = "".join(f'; {name}="{value}"' for name, value in self.params.items())
        return f"{self.essence}{params}"


def parse_media_type(value: str) -> MediaType:
    """Parse a ``Content-Type`` header value.

    Parameters
    ----------
    value
        e.g. ``multipart/related; type="application/dicom"; boundary=abc``.

    Returns
    -------
    MediaType

    Raises
    ------
    MediaTypeError
        if *value* has no ``type/subtype``, a parameter without ``=``, an
        unterminated quoted string or the same parameter twice.
    """
    text = value.strip(_WS)
    end = text.find(";")
    head = (text if end < 0 else text[:end]).strip(_WS)
    kind, slash, subtype = head.partition("/")
    if not slash or not _TOKEN.fullmatch(kind) or not _TOKEN.fullmatch(subtype):
        raise MediaTypeError("not a media type (type/subtype)")
    params: dict[str, str] = {}
    pos = len(text) if end < 0 else end
    while pos < len(text):
        pos = _skip_ws(text, pos + 1)  # past the ";"
        if pos >= len(text) or text[pos] == ";":
            continue  # an empty parameter is allowed (RFC 9110 8.3.1)
        match = _TOKEN.match(text, pos)
        if match is None or match.end() >= len(text) or text[match.end()] != "=":
            raise MediaTypeError("a media type parameter is not name=value")
        name = match.group().lower()
        pos = match.end() + 1
        if pos < len(text) and text[pos] == '"':
            param, pos = _quoted_string(text, pos)
        else:
            stop = text.find(";", pos)
            stop = len(text) if stop < 0 else stop
            param = text[pos:stop].strip(_WS)
            pos = stop
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] != ";":
            raise MediaTypeError("text after a quoted media type parameter")
        if name in params:
            raise MediaTypeError(f"the media type parameter {name!r} is given twice")
        params[name] = param
    return MediaType(f"{kind.lower()}/{subtype.lower()}", params)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _quoted_string(text: str, pos: int) -> tuple[str, int]:
    """The unescaped content of the quoted string at *pos* and the position
    after its closing quote (RFC 9110 5.6.4)."""
    out: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
            continue
        if char == '"':
            return "".join(out), pos + 1
        out.append(char)
        pos += 1
    raise MediaTypeError("an unterminated quoted string in a media type")


def dicom_json_response(
    body: Dataset | list[Dataset], status: int = 200, *, media_type: str = APPLICATION_DICOM_JSON
) -> Response:
    """A response of one DICOM JSON object or an array of them (PS3.18 F.2).

    Parameters
    ----------
    body
        The data set(s); bulk data must not be among them (no bulk data
        handler is given to ``to_json_dict``).
    status
        The HTTP status.
    media_type
        ``application/dicom+json`` or, for a client that asked for it,
        ``application/json``.
    """
    if isinstance(body, Dataset):
        payload: object = body.to_json_dict()
    else:
        payload = [item.to_json_dict() for item in body]
    # JSON text is UTF-8 (RFC 8259 8.1); no charset parameter is sent, as
    # DICOMweb clients compare the media type literally
    return Response(
        json.dumps(payload, ensure_ascii=False).encode("utf-8"),
        status=status,
        mimetype=media_type,
    )
