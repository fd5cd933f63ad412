"""``python -m bench profile``: where the CPU goes on the two ingest paths.

Starts ``dicom-appliance serve`` on the embedded default (SQLite + disk, in
a temporary folder), from this tree or from ``--tree PATH`` (an older
checkout, to profile the code as it was before a change; it runs with this
virtualenv's packages), and records it with py-spy while a fixed load
arrives:

- ``cstore``: dcmtk ``storescu``, 4 associations at once, small instances
  (64 x 64, 16-bit: the per-object overhead is what is looked at);
- ``stow``: STOW-RS, 4 clients at once, 50 instances per request, the same
  kind of instances (another set: nothing is a duplicate).

Each load runs twice on new instances: first with nothing attached, for the
figures, then with py-spy sampling every process of ``serve``
(``--subprocesses``, ``--nonblocking``: the processes are not stopped to be
read), keeping only samples that hold the GIL (``--gil``: Python at work,
not a thread waiting on a socket, a lock or an fsync).  For each load the folder gets:

- ``<load>.svg``: a flame graph of the samples (widest = most CPU; hover a
  frame for its share), drawn here from the folded stacks;
- ``<load>.folded``: the samples as folded stacks (py-spy's ``raw`` format,
  also read by speedscope and flamegraph.pl);
- ``summary.json`` and the printed summary: instances per second, CPU
  milliseconds per instance over all the processes of ``serve`` (from
  ``/proc/<pid>/stat``, user + system), and the frames with the largest
  inclusive and self shares of the samples.

The CPU figures are the ones to compare between two trees: they come from
the run without py-spy, and the same load is sent to each tree.  Not part
of ``make test``; ``make profile`` runs it on this tree.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench import dicomweb, dimse
from bench.corpus import InstanceSet
from bench.servers import Server, appliance, process_tree

SEED = "bench-profile"
#: Instances per load: enough for some 20-30 s of work on two cores.
COUNT = 4000
CLIENTS = 4
PER_REQUEST = 50
#: py-spy's samples per second in each process.
RATE = 250
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def py_spy() -> str:
    """The py-spy program beside this interpreter (``pip install py-spy``)."""
    found = Path(sys.executable).with_name("py-spy")
    if found.is_file():
        return str(found)
    other = shutil.which("py-spy")
    if other is None:
        raise RuntimeError("py-spy is missing: pip install py-spy (make profile installs it)")
    return other


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU time of *pids*, in seconds."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
            # utime and stime: fields 14 and 15 of proc(5), 12 and 13 after the name
            user += int(fields[11])
            system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def serving(tree: Path | None, version: str) -> contextlib.AbstractContextManager[Server]:
    """``serve`` from *tree* (None: this one) on its defaults, in a
    temporary folder, until the block ends."""
    return appliance(tree=tree, version=version)


def _store(server: Server, files: list[Path]) -> None:
    shares = [files[i::CLIENTS] for i in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(dimse.storescu, server, share) for share in shares]:
            future.result()


def _stow(server: Server, bodies: list[list[bytes]]) -> None:
    _seconds, acknowledged = dicomweb.stow(server, bodies)
    expected = sum(body.count(b"\r\nContent-Type: application/dicom") for s in bodies for body in s)
    if acknowledged != expected:
        raise RuntimeError(f"STOW-RS acknowledged {acknowledged} of {expected}")


def _count(server: Server) -> int:
    """Instances the index lists (so the load's work is checked), from the
    studies' NumberOfStudyRelatedInstances, a page of 100 at a time."""
    total = offset = 0
    with httpx.Client(timeout=60) as http:
        while True:
            response = http.get(
                f"{server.root}/studies",
                params={"includefield": "00201208", "limit": "100", "offset": str(offset)},
                headers={"Accept": "application/dicom+json"},
            )
            if response.status_code == 204:
                return total
            response.raise_for_status()
            page = response.json()
            total += sum(int(study["00201208"]["Value"][0]) for study in page)
            if len(page) < 100:
                return total
            offset += 100


def measure(server: Server, label: str, run: Callable[[], None], instances: int) -> dict[str, Any]:
    """Run *run* with nothing attached; its speed and the CPU time of all
    the processes of *server* per instance, checked by the count stored."""
    before = _count(server)
    pids = process_tree(server.pid)
    user, system = cpu_seconds(pids)
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    user_after, system_after = cpu_seconds(pids)
    stored = _count(server) - before
    if stored != instances:
        raise RuntimeError(f"{label}: {stored} instances stored, {instances} sent")
    return {
        "instances": instances,
        "seconds": round(seconds, 2),
        "instances_per_s": round(instances / seconds, 1),
        "cpu_ms_per_instance": round(
            (user_after + system_after - user - system) * 1000 / instances, 2
        ),
        "user_ms_per_instance": round((user_after - user) * 1000 / instances, 2),
        "system_ms_per_instance": round((system_after - system) * 1000 / instances, 2),
    }


def record(server: Server, label: str, out: Path, run: Callable[[], None]) -> dict[str, Any]:
    """Run *run* again (on other instances) while py-spy samples every
    process of *server* without stopping them (``--nonblocking``); writes
    the folded stacks and the flame graph, returns the profile's summary."""
    folded = out / f"{label}.folded"
    spy = subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(server.pid),
            "--subprocesses",
            "--gil",
            "--nonblocking",
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--output",
            str(folded),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(2)  # py-spy attaches to each process
    run()
    spy.send_signal(signal.SIGINT)  # py-spy writes its output and stops
    _out, err = spy.communicate(timeout=120)
    if not folded.is_file():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
    stacks = read_folded(folded)
    (out / f"{label}.svg").write_text(flame_graph(stacks, f"{label}: {server.version}"))
    return {
        "samples": sum(stacks.values()),
        "inclusive": top_frames(stacks, inclusive=True),
        "self": top_frames(stacks, inclusive=False),
    }


# ------------------------------------------------------------------- analysis


_LINE = re.compile(r":\d+\)$")


def read_folded(path: Path) -> dict[tuple[str, ...], int]:
    """Folded stacks (``a;b;c 12`` per line) as {frames: samples}, without
    py-spy's process and thread frames (``process 123:...``,
    ``thread (0x...)``) and without line numbers."""
    stacks: dict[tuple[str, ...], int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(
            _LINE.sub(")", frame)  # one box per function, not per line of it
            for frame in stack.split(";")
            if not frame.startswith(("process ", "thread ")) and frame != "<module> (<string>:1)"
        )
        stacks[frames] = stacks.get(frames, 0) + int(count)
    return stacks


def _short(frame: str) -> str:
    """``function (package/module.py)``: the function and the last two
    parts of its file's path."""
    return f"{frame.partition(' (')[0]} ({_where(frame)})"


def top_frames(
    stacks: dict[tuple[str, ...], int], *, inclusive: bool, limit: int = 30
) -> list[tuple[str, float]]:
    """The functions with the largest share of the samples: *inclusive*
    counts a sample for every function on its stack (once each), else only
    for the innermost one."""
    total = sum(stacks.values()) or 1
    counts: dict[str, int] = {}
    for stack, count in stacks.items():
        # the processes' and threads' start-up frames are under every sample
        frames = tuple(f for f in stack if _where(f) not in _ENTRY)
        names = (
            {_short(f) for f in frames} if inclusive else {_short(frames[-1])} if frames else set()
        )
        for name in names:
            counts[name] = counts.get(name, 0) + count
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:limit]
    return [(name, round(100 * count / total, 1)) for name, count in ranked]


_ENTRY = {
    "threading.py",
    "futures/thread.py",
    "<frozen runpy>",
    "appliance/server.py",
    "gunicorn/arbiter.py",
    "app/base.py",
    "workers/base.py",
}


def _where(frame: str) -> str:
    """The last two parts of a frame's file path."""
    path = frame.rpartition(" (")[2].rstrip(")")
    return "/".join(path.split("/")[-2:])


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.value = 0
        self.children: dict[str, _Node] = {}


def flame_graph(stacks: dict[tuple[str, ...], int], title: str, width: int = 1200) -> str:
    """An SVG flame graph (root at the bottom) of *stacks*; frames under
    0.1% of the samples are left out."""
    root = _Node()
    for frames, count in stacks.items():
        node = root
        node.value += count
        for frame in frames:
            node = node.children.setdefault(frame, _Node())
            node.value += count
    total = root.value or 1
    row, depth_max = 17, 0
    boxes: list[tuple[float, int, float, str, int]] = []

    def walk(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        for name, child in sorted(node.children.items()):
            w = child.value / total * (width - 20)
            if child.value / total >= 0.001:
                boxes.append((x, depth, w, name, child.value))
                depth_max = max(depth_max, depth)
                walk(child, x, depth + 1)
            x += w

    walk(root, 10.0, 0)
    height = (depth_max + 1) * row + 50
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="Verdana, sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="#f8f8f4"/>',
        f'<text x="10" y="20" font-size="14">{html.escape(title)} '
        f"({total} samples holding the GIL)</text>",
    ]
    for x, depth, w, name, value in boxes:
        y = height - 10 - (depth + 1) * row
        digest = hashlib.sha1(name.split(" (")[0].encode(), usedforsecurity=False).digest()
        fill = f"rgb({205 + digest[0] % 50},{80 + digest[1] % 130},{40 + digest[2] % 50})"
        label = _short(name)
        fits = int(w / 6.5)
        text = label if len(label) <= fits else (label[: fits - 2] + ".." if fits > 3 else "")
        out.append(
            f"<g><title>{html.escape(label)}: {value} samples, {100 * value / total:.1f}%</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.1):.1f}" height="{row - 1}" '
            f'fill="{fill}" rx="2"/>'
            + (f'<text x="{x + 3:.1f}" y="{y + 12}">{html.escape(text)}</text>' if text else "")
            + "</g>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tree", type=Path, help="profile the appliance of this checkout")
    parser.add_argument(
        "--label", help="the folder's name under bench/results (default: the commit)"
    )
    parser.add_argument("--out", type=Path, help="write here instead")
    parser.add_argument("--count", type=int, default=COUNT, help=f"instances per load ({COUNT})")
    args = parser.parse_args(argv)
    tree = args.tree
    commit = subprocess.run(
        ["git", "-C", str(tree or Path(__file__).parent), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    out = (
        args.out or Path(__file__).parent / "results" / f"profile-{args.label or commit or 'tree'}"
    )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-profile-corpus-") as tmp:

        def instances(name: str) -> InstanceSet:
            return InstanceSet(f"profile-{name}", 64, args.count, 100, SEED)

        files = {n: instances(f"cstore-{n}").write(Path(tmp)) for n in ("measured", "recorded")}
        bodies = {
            n: dicomweb.stow_bodies(list(instances(f"stow-{n}").render()), CLIENTS, PER_REQUEST)
            for n in ("measured", "recorded")
        }
        summary: dict[str, Any] = {"tree": str(tree or "."), "commit": commit}
        with serving(tree, commit) as server:
            for label, load in (
                ("cstore", lambda n: _store(server, files[n])),
                ("stow", lambda n: _stow(server, bodies[n])),
            ):
                found = measure(server, label, functools.partial(load, "measured"), args.count)
                found |= record(server, label, out, functools.partial(load, "recorded"))
                summary[label] = found
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for label in ("cstore", "stow"):
        found = summary[label]
        print(
            f"\n{label}: {found['instances_per_s']} instances/s, "
            f"{found['cpu_ms_per_instance']} ms of CPU per instance (all processes; "
            f"user {found['user_ms_per_instance']}, system {found['system_ms_per_instance']}), "
            f"{found['samples']} samples"
        )
        print("  inclusive:")
        for name, share in found["inclusive"][:15]:
            print(f"    {share:5.1f}%  {name}")
        print("  self:")
        for name, share in found["self"][:10]:
            print(f"    {share:5.1f}%  {name}")
    print(f"\nprofiles: {out}")
    return 0
