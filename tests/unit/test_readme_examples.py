"""Every TOML example of the README is a configuration the appliance takes
(with its file paths pointing somewhere real)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.config import load_config

README = Path(__file__).parents[2] / "README.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_example_loads(number: int, tmp_path: Path) -> None:
    text = "\n".join(line.strip() for line in BLOCKS[number].splitlines())
    if "commit_after_forward" in text and not re.search(r"^\[\[forward\]\]", text, re.M):
        # that example adds a peer to the forwarding example before it
        text = 'forward = [{name = "cloud", url = "https://dicom.example/v2"}]\n' + text
    path = tmp_path / "appliance.toml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path, environ={}, cwd=tmp_path)
    assert config.source == path
