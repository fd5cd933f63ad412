"""Readers of the packaging files (``systemd/``, ``Dockerfile``) for the tests:
each reads the file the way the program that uses it does, as far as the
tests need."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "dicom-appliance.service"
ENV_EXAMPLE = SYSTEMD / "appliance.env.example"
INSTALL_SH = SYSTEMD / "install.sh"
DOCKERFILE = ROOT / "Dockerfile"


def tool(name: str) -> str | None:
    """*name* beside this Python (a dev-extra package's binary) or on the PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


# --------------------------------------------------------------------------
# systemd


def unit_settings(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}`` of a unit file (systemd.syntax(7):
    ``#`` and ``;`` comments, a key may repeat; no line continuations here)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"a continued line is not read here: {raw!r}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a setting before any section: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(key: str, path: Path = UNIT) -> str:
    """The one value of *key* in the unit's ``[Service]`` section."""
    values = unit_settings(path)["Service"].get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def exec_start(path: Path = UNIT) -> list[str]:
    """The unit's ``ExecStart=`` as an argument vector (systemd splits it with
    shell-like quoting; no ``$`` variables or ``%`` specifiers are used)."""
    line = service("ExecStart", path)
    assert "$" not in line, line
    assert "%" not in line, line
    return shlex.split(line)


def env_file(path: Path) -> dict[str, str]:
    """The assignments of an ``EnvironmentFile=`` (see :func:`parse_env`)."""
    return parse_env(path.read_text(encoding="utf-8"))


def parse_env(text: str) -> dict[str, str]:
    """Environment-file assignments as systemd reads them: one ``KEY=value``
    a line, ``#``/``;`` comments, one pair of surrounding quotes removed (the
    subset ``systemd/appliance.env.example`` allows, and install.sh reads)."""
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[key.strip()] = value
    return found


def env_example_blocks(path: Path = ENV_EXAMPLE) -> list[dict[str, str]]:
    """The commented-out examples of the env file, one dict per block of
    consecutive ``#APPLIANCE_...=`` lines, as if uncommented."""
    blocks: list[dict[str, str]] = []
    current: list[str] = []
    for raw in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        if raw.startswith("#APPLIANCE_"):
            current.append(raw[1:])
        elif current:
            blocks.append(parse_env("\n".join(current)))
            current = []
    return blocks


# --------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined and
    comments dropped (the Dockerfile reference's syntax, as far as used)."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if stripped.endswith("\\"):
            continue
        word, _, rest = pending.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def final_stage(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that is run)."""
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument list, e.g. of ENTRYPOINT or CMD."""
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    assert all(isinstance(v, str) for v in value), arguments
    return value


def image_setting(word: str, path: Path = DOCKERFILE) -> str:
    """The arguments of the last *word* instruction of the final stage (the
    one in force)."""
    found = [rest for name, rest in final_stage(path) if name == word]
    assert found, f"no {word} in the final stage"
    return found[-1]


def image_env(path: Path = DOCKERFILE) -> dict[str, str]:
    """Every ``ENV KEY=value ...`` of the final stage."""
    env: dict[str, str] = {}
    for name, rest in final_stage(path):
        if name == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV in the KEY=value form only: {rest!r}"
                env[key] = value
    return env


def healthcheck_command(path: Path = DOCKERFILE) -> list[str]:
    """The HEALTHCHECK's ``CMD [...]``, without its options."""
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(\[.*\])", image_setting("HEALTHCHECK", path))
    assert match, "HEALTHCHECK in the exec form: CMD [...]"
    return exec_form(match.group(1))
