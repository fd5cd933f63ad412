"""How an upstream's STOW-RS answers are sorted (PS3.18 10.5.3, Table I.1-1),
Retry-After, the back-off, and the [[forward]] configuration."""

from __future__ import annotations

import email.utils
import json
from pathlib import Path

import httpx
import pytest

from appliance.config import load_config, render_config
from appliance.errors import ConfigError
from appliance.forward.upstream import sort_stow_answer
from appliance.outbound import backoff, retry_after

UIDS = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]


def answer(status: int, body: object | None = None, **headers: str) -> httpx.Response:
    if body is None:
        return httpx.Response(status, headers=headers)
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/dicom+json", **headers},
    )


def referenced(uid: str, warning: int | None = None) -> dict[str, object]:
    item: dict[str, object] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def failed(uid: str, reason: int) -> dict[str, object]:
    return {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}


def store_response(refs: list[dict[str, object]], fails: list[dict[str, object]]) -> object:
    body: dict[str, object] = {}
    if refs:
        body["00081199"] = {"vr": "SQ", "Value": refs}
    if fails:
        body["00081198"] = {"vr": "SQ", "Value": fails}
    return body


def test_200_without_a_body_delivers_everything() -> None:
    outcome = sort_stow_answer(answer(200), UIDS)
    assert outcome.delivered == set(UIDS)
    assert not (outcome.transient)
    assert not (outcome.permanent)
    assert not (outcome.duplicate)


def test_202_is_sorted_per_instance() -> None:
    """PS3.18 10.5.3: some stored, some failed; 0xA700 and 0x0110 are the
    upstream's own trouble (transient), 0xA900 and 0xC000 the instance's
    (permanent), 0x0111 and 45070 (0xB00E) say it is there already, and an
    instance the answer does not name is tried again."""
    uids = [f"1.2.3.{n}" for n in range(1, 9)]
    body = store_response(
        [referenced(uids[0]), referenced(uids[1], warning=0xB00E)],
        [
            failed(uids[2], 0xA700),
            failed(uids[3], 0x0110),
            failed(uids[4], 0xA900),
            failed(uids[5], 0xC000),
            failed(uids[6], 45070),
        ],
    )
    outcome = sort_stow_answer(answer(202, body), uids)
    assert outcome.delivered == {uids[0]}
    assert outcome.duplicate == {uids[1], uids[6]}
    assert set(outcome.transient) == {uids[2], uids[3], uids[7]}
    assert set(outcome.permanent) == {uids[4], uids[5]}
    assert "0xA900 (43264)" in outcome.permanent[uids[4]]


def test_409_naming_a_duplicate_is_a_duplicate() -> None:
    body = store_response([], [failed(UIDS[0], 0x0111)])
    assert sort_stow_answer(answer(409, body), UIDS[:1]).duplicate == {UIDS[0]}


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_busy_or_broken_upstreams_are_tried_again(status: int) -> None:
    outcome = sort_stow_answer(answer(status, **{"Retry-After": "17"}), UIDS)
    assert set(outcome.transient) == set(UIDS)
    assert outcome.retry_after == 17
    assert f"HTTP {status}" in outcome.transient[UIDS[0]]


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_tried_again(status: int) -> None:
    outcome = sort_stow_answer(answer(status), UIDS)
    assert set(outcome.transient) == set(UIDS)
    assert "credentials refused" in outcome.transient[UIDS[0]]


@pytest.mark.parametrize("status", [400, 404, 405, 413, 415, 501, 505])
def test_other_refusals_are_permanent(status: int) -> None:
    response = httpx.Response(status, text="Unsupported media type\n  for this server")
    outcome = sort_stow_answer(response, UIDS)
    assert set(outcome.permanent) == set(UIDS)
    assert f"HTTP {status}: Unsupported media type for this server" in outcome.permanent[UIDS[0]]


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after(answer(503, **{"Retry-After": "120"})) == 120
    date = email.utils.formatdate(1_000_060, usegmt=True)
    assert retry_after(answer(503, **{"Retry-After": date}), now=1_000_000) == 60
    assert retry_after(answer(503, **{"Retry-After": "soon"})) is None
    assert retry_after(answer(503)) is None


def test_backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() -> None:
    for attempts, high in ((0, 1.0), (1, 2.0), (3, 8.0), (10, 300.0), (60, 300.0)):
        for _ in range(50):
            delay = backoff(attempts, 300)
            assert high / 2 <= delay <= high
    assert backoff(0, 300, retry_after=90) == 90
    assert backoff(0, 300, retry_after=10**6) == 3600  # capped at an hour


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_forward_destinations_load_with_their_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[forward]]\nname = "cloud"\nurl = "https://dicom.example/v2"\n'
        'auth = "oauth2"\ntoken_url = "https://login.example/token"\n'
        'client_id = "appliance"\nclient_secret = "s3cret"\nmodalities = ["CT", "MR"]\n'
        '\n[[forward]]\nname = "pacs"\nurl = "http://127.0.0.1:8042/dicom-web"\n'
        "forward_deletes = false\n",
    )
    config = load_config(path, environ={}, cwd=tmp_path)
    cloud, pacs = config.forward
    assert (cloud.name, cloud.url, cloud.auth, cloud.modalities) == (
        "cloud",
        "https://dicom.example/v2",
        "oauth2",
        ("CT", "MR"),
    )
    assert (cloud.batch_size, cloud.concurrency, cloud.explicit_vr_only) == (20, 2, False)
    assert pacs.forward_deletes is False
    shown = render_config(config)
    assert "[[forward]]" in shown
    assert "s3cret" not in shown


def test_forward_from_the_environment(tmp_path: Path) -> None:
    config = load_config(
        None,
        environ={"APPLIANCE_FORWARD": '[{name = "up", url = "http://127.0.0.1:9/dicomweb"}]'},
        cwd=tmp_path,
    )
    assert [d.name for d in config.forward] == ["up"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[forward]]\nname = "a b"\nurl = "http://x"\n', "forward[0].name"),
        ('[[forward]]\nname = "a"\nurl = "ftp://x"\n', "forward[0].url"),
        ('[[forward]]\nname = "a"\nurl = "http://x/"\n', "forward[0].url"),
        ('[[forward]]\nname = "a"\nurl = "http://x"\ncolour = 1\n', "forward[0].colour"),
        ('[[forward]]\nname = "a"\nurl = "http://x"\nauth = "bearer"\n', "forward[0].token_file"),
        ('[[forward]]\nname = "a"\nurl = "http://x"\nauth = "basic"\n', "forward[0].username"),
        ('[[forward]]\nname = "a"\nurl = "http://x"\nbatch_size = 0\n', "forward[0].batch_size"),
        (
            '[[forward]]\nname = "a"\nurl = "http://x"\n'
            'calling_ae_titles = ["TOO_LONG_A_TITLE_"]\n',
            "forward[0].calling_ae_titles",
        ),
        (
            '[[forward]]\nname = "a"\nurl = "http://x"\n[[forward]]\nname = "a"\nurl = "http://y"\n',
            "forward[1].name",
        ),
        ("forward = 1\n", "forward"),
        (
            '[[dimse.peers]]\nae_title = "CT"\nhost = "h"\ncommit_after_forward = "cloud"\n',
            "dimse.peers[0].commit_after_forward",
        ),
    ],
)
def test_bad_forward_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={}, cwd=tmp_path)
    assert info.value.key == key
