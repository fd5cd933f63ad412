"""The analysis behind ``make profile`` (bench/profile.py): folded stacks
read, the shares of the samples counted, a flame graph drawn."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from bench.profile import flame_graph, read_folded, top_frames

DIMSE = 'process 10:"python -m appliance.server dimse";thread (0x7f);Thread.run (threading.py:982)'
STORE = (
    "handle_store (dimse_bridge/services/storage.py:240);store (/w/appliance/ingest/pipeline.py:10)"
)
HTTP = 'process 11:"python -m appliance.server http";thread (0x80);Thread.run (threading.py:982)'
FOLDED = (
    f"{DIMSE};{STORE};put (/w/appliance/storage/filesystem.py:77) 6\n"
    f"{DIMSE};{STORE};execute (/v/site-packages/sqlalchemy/engine/base.py:1400) 3\n"
    f"{HTTP};recv (/v/site-packages/gunicorn/http/body.py:50) 1\n"
)


def test_folded_stacks_without_process_and_thread_frames(tmp_path: Path) -> None:
    path = tmp_path / "x.folded"
    path.write_text(FOLDED)
    stacks = read_folded(path)
    assert sum(stacks.values()) == 10
    assert all(not f.startswith(("process ", "thread ")) for s in stacks for f in s)
    assert len(stacks) == 3


def test_inclusive_and_self_shares(tmp_path: Path) -> None:
    path = tmp_path / "x.folded"
    path.write_text(FOLDED)
    stacks = read_folded(path)
    inclusive = dict(top_frames(stacks, inclusive=True))
    # the threads' start-up frame is under every sample: left out
    assert not any(name.startswith("Thread.run") for name in inclusive)
    assert inclusive["handle_store (services/storage.py)"] == 90.0
    assert inclusive["store (ingest/pipeline.py)"] == 90.0
    assert inclusive["put (storage/filesystem.py)"] == 60.0
    own = dict(top_frames(stacks, inclusive=False))
    assert own == {
        "put (storage/filesystem.py)": 60.0,
        "execute (engine/base.py)": 30.0,
        "recv (http/body.py)": 10.0,
    }


def test_flame_graph_is_svg_with_a_box_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "x.folded"
    path.write_text(FOLDED)
    svg = flame_graph(read_folded(path), "cstore: <test> & co")
    root = ET.fromstring(svg)  # noqa: S314 (our own output)
    ns = "{http://www.w3.org/2000/svg}"
    titles = [t.text or "" for t in root.iter(f"{ns}title")]
    # Thread.run (both threads' stacks start there), handle_store, store,
    # put, execute, recv
    assert len(titles) == 6
    assert any(t.startswith("put (storage/filesystem.py): 6 samples, 60.0%") for t in titles)
    widths = {
        t: float(g.find(f"{ns}rect").get("width", "0"))  # type: ignore[union-attr]
        for g in root.iter(f"{ns}g")
        for t in [g.find(f"{ns}title").text]  # type: ignore[union-attr]
    }
    store = next(w for t, w in widths.items() if t and t.startswith("store "))
    put = next(w for t, w in widths.items() if t and t.startswith("put "))
    assert abs(put / store - 6 / 9) < 0.01
