"""Coverage-guided fuzzing in the ordinary test run: each atheris target of
tests/fuzz/harness.py runs in its own process for a bounded time
(``APPLIANCE_FUZZ_SECONDS``, default 20 s each, four targets), seeded with
tests/fuzz/corpus/TARGET.  A crash fails the test and names the input
libFuzzer saved; that input becomes an ``@example`` or a regression test in
test_fuzz_properties.py once fixed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

HERE = Path(__file__).parent
SECONDS = int(os.environ.get("APPLIANCE_FUZZ_SECONDS", "20"))


@pytest.mark.parametrize("target", ["multipart", "part10", "qido", "cfind"])
def test_atheris_finds_no_crash(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is in the dev extras")
    corpus = tmp_path / "corpus"  # new inputs go here, never into the seed folder
    corpus.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.harness",
            target,
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=2048",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
            str(HERE / "corpus" / target),
        ],
        cwd=HERE.parent.parent,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(
        p.name for p in tmp_path.glob("timeout-*")
    )
    assert result.returncode == 0, f"{target}: {crashes}\n{result.stderr[-4000:]}"
    done = re.search(r"Done (\d+) runs in (\d+) second", result.stderr)
    assert done, result.stderr[-2000:]
    assert int(done.group(1)) > 100  # it ran, not just started
    print(f"atheris {target}: {done.group(1)} runs in {done.group(2)} s")
