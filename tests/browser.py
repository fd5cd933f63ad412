"""Headless Chromium for the browser tests (issue 10), driven by Playwright.

The browser is Debian's (``apt-get install chromium chromium-driver``:
``/usr/bin/chromium``), never one Playwright downloads.  Each use gets a
fresh user-data-dir and the flags that keep Chromium off the network: it
talks only to the appliance on loopback.  A missing Chromium or Playwright
skips the test, or fails it under CI (:func:`tests.conftest.missing_peer`).

Screenshots go to :data:`ARTIFACTS` (``tests/artifacts/screenshots``, or
``$APPLIANCE_TEST_ARTIFACTS/screenshots``), kept after the run; the README's
pictures are copies of them (``docs/screenshots``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("APPLIANCE_TEST_CHROMIUM", "/usr/bin/chromium"))

#: The flags every test starts Chromium with (issue 10).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

#: Where screenshots are kept after the run.
ARTIFACTS = (
    Path(os.environ["APPLIANCE_TEST_ARTIFACTS"])
    if os.environ.get("APPLIANCE_TEST_ARTIFACTS")
    else Path(__file__).resolve().parent / "artifacts"
) / "screenshots"


@contextlib.contextmanager
def chromium(
    *, extra_flags: tuple[str, ...] = (), viewport: tuple[int, int] = (1280, 800)
) -> Iterator[Any]:
    """A Playwright ``BrowserContext`` of a fresh headless Chromium.

    Parameters
    ----------
    extra_flags
        Flags added to :data:`FLAGS` (say, for WebGL in software).
    viewport
        The page size of every page of the context.
    """
    from tests.conftest import missing_peer

    if not CHROMIUM.is_file():
        missing_peer(f"Chromium is not installed ({CHROMIUM}; apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_peer("Playwright for Python is not installed (pip install playwright)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            # Playwright's own defaults (its automation flags) stay; ours are added
            args=[*FLAGS, *extra_flags],
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            yield context
        finally:
            context.close()


def screenshot(page: Any, name: str, **kwargs: Any) -> Path:
    """Save a PNG of *page* as ``ARTIFACTS/<name>.png`` and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), **kwargs)
    return path


def is_real_image(data: bytes, *, min_side: int = 8) -> bool:
    """Whether *data* decodes (Pillow) to an image at least *min_side*
    pixels wide and high whose pixels are not all one value."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if min(image.size) < min_side:
            return False
        extrema = image.convert("L").getextrema()
    low, high = extrema  # type: ignore[misc]
    return bool(high > low)
