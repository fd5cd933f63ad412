"""Coverage-guided fuzzing with atheris (libFuzzer) of the parsers that face
the network, one target per run::

    python -m tests.fuzz.harness TARGET [libFuzzer options] [CORPUS...]

Targets: ``multipart`` (the STOW-RS body parser), ``part10`` (ingest's
header reader and the WADO-RS metadata renderer), ``qido`` (QIDO-RS query
parameters, parsed and run against an SQLite index), ``cfind`` (C-FIND
identifier bytes, decoded as pynetdicom does and mapped to a query).

The property is the one of tests/fuzz/test_fuzz_properties.py: only an
:class:`~appliance.errors.ApplianceError` may escape, and outputs are
well-formed.  Anything else is a crash: libFuzzer writes the input to
``crash-*`` under ``-artifact_prefix`` and exits non-zero.
tests/fuzz/test_atheris.py runs each target for a bounded time.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["appliance", "dicomweb", "dimse_bridge"]):
    from appliance.dicomio import extract_record, read_header
    from appliance.errors import ApplianceError
    from appliance.model import Level
    from dicomweb.metadata import instance_json, serialise
    from dicomweb.metadata import read_header as read_stored_header
    from dicomweb.multipart import LimitedReader, MultipartReader
    from dicomweb.views.qido import parse_search
    from dimse_bridge.identifiers import InformationModel, parse_find

from pynetdicom.dsutils import decode
from werkzeug.datastructures import MultiDict


def fuzz_multipart(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    boundary = fdp.ConsumeString(8) or "b"
    chunk = fdp.ConsumeIntInRange(1, 64)
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        with MultipartReader(
            LimitedReader(io.BytesIO(body), 1 << 20), boundary, chunk_size=chunk, max_parts=64
        ) as reader:
            for part in reader:
                assert len(part.body.read()) == part.size
    except ApplianceError:
        pass


def fuzz_part10(data: bytes) -> None:
    with contextlib.suppress(ApplianceError):
        extract_record(read_header(io.BytesIO(data)))
    try:
        header = read_stored_header(io.BytesIO(data))
        json.loads(serialise(instance_json(header, lambda path: "bulk/" + path)))
    except ApplianceError:
        pass


def _query_service() -> object:
    from appliance.config import load_config
    from appliance.index import migrate
    from appliance.index.engine import create_index_engine
    from appliance.services import build_services

    folder = Path(tempfile.mkdtemp(prefix="fuzz-qido-"))
    config = load_config(
        environ={
            "APPLIANCE_STORAGE_PATH": str(folder / "blobs"),
            "APPLIANCE_INDEX_URL": f"sqlite:///{folder / 'index.db'}",
        },
        cwd=folder,
    )
    engine = create_index_engine(config.index.url)
    migrate.upgrade(engine)
    engine.dispose()
    return build_services(config).query


def make_fuzz_qido() -> Callable[[bytes], None]:
    from appliance.query import Query

    service = _query_service()
    levels = [Level.STUDY, Level.SERIES, Level.IMAGE]

    def fuzz_qido(data: bytes) -> None:
        if not data:
            return
        level = levels[data[0] % 3]
        pairs = urllib.parse.parse_qsl(data[1:].decode("utf-8", "replace"), keep_blank_values=True)
        try:
            search = parse_search(level, MultiDict(pairs), service)  # type: ignore[arg-type]
            result = service.search(  # type: ignore[attr-defined]
                Query(level, search.keys, limit=10, offset=search.offset)
            )
            json.dumps([dict(m) for m in result.matches], default=str)
        except ApplianceError:
            pass

    return fuzz_qido


def make_fuzz_cfind() -> Callable[[bytes], None]:
    service = _query_service()
    models = [InformationModel.PATIENT_ROOT, InformationModel.STUDY_ROOT]

    def fuzz_cfind(data: bytes) -> None:
        if not data:
            return
        try:
            identifier = decode(io.BytesIO(data[1:]), True, True)
        except Exception:  # noqa: BLE001 - pynetdicom refuses it before any handler runs
            return
        try:
            find = parse_find(identifier, models[data[0] % 2], service)  # type: ignore[arg-type]
            service.search(find.query())  # type: ignore[attr-defined]
        except ApplianceError:
            pass

    return fuzz_cfind


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "multipart": lambda: fuzz_multipart,
    "part10": lambda: fuzz_part10,
    "qido": make_fuzz_qido,
    "cfind": make_fuzz_cfind,
}


def main() -> None:
    target = TARGETS[sys.argv[1]]()
    warnings.simplefilter("ignore")  # pydicom warns about every odd value
    import logging

    logging.disable(logging.CRITICAL)
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
