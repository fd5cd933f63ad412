"""The operator console in headless Chromium (issue 10), against a live
appliance on loopback (DIMSE listener and HTTP in this process) fed by
dcmtk's storescu: the dashboard shows the numbers of a known C-STORE
workload, the study list finds a study by patient name, the study page's
thumbnails are real images, delete asks first and then removes the study,
the zip download holds the instances byte for byte as WADO-RS gives them,
retry queues parked forwards again, and in token mode the login cookie,
the read/admin split, the CSRF token and the redirect to the login page.

Screenshots of each page go to ``tests/artifacts/screenshots``
(:func:`tests.browser.screenshot`); README's pictures are copies of them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from appliance.access import ApiTokens
from appliance.config import Config, load_config
from appliance.forward.outbox import Outbox
from dicomweb.auth import CSRF_FIELD, csrf_token
from tests.browser import chromium, is_real_image, screenshot
from tests.conftest import LiveAppliance, dcmtk, started_appliance
from tests.peers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.interop, pytest.mark.slow]

#: The calling AE title of the workload's storescu.
SCANNER = "CT_SCANNER"


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the known C-STORE workload sent: two studies, five instances."""

    files: list[Path]
    alice: str  # study of 3 CT instances, patient Console^Alice
    bob: str  # study of 2 MR instances, patient Console^Bob
    series: dict[str, str]  # study -> its one series

    @property
    def instances(self) -> int:
        return len(self.files)


def build_workload(folder: Path) -> Workload:
    """Five Part 10 files from pydicom's CT_small (128 x 128) and MR_small
    (64 x 64), with new UIDs: real pixel data, so real thumbnails."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    studies: dict[str, str] = {}
    series: dict[str, str] = {}
    plan = (
        ("CT_small.dcm", "Console^Alice", "ALICE-1", "ACC-100", "20240105", 3),
        ("MR_small.dcm", "Console^Bob", "BOB-2", "ACC-200", "20240320", 2),
    )
    for source, name, patient_id, accession, date, count in plan:
        study, serie = generate_uid(), generate_uid()
        studies[name], series[study] = study, serie
        for number in range(1, count + 1):
            ds = dcmread(get_testdata_file(source))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, serie
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientName, ds.PatientID = name, patient_id
            ds.AccessionNumber, ds.StudyDate = accession, date
            ds.StudyDescription = f"console test {source[:2]}"
            ds.InstanceNumber = number
            path = folder / f"{patient_id}-{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return Workload(files, studies["Console^Alice"], studies["Console^Bob"], series)


def send(appliance: LiveAppliance, workload: Workload) -> None:
    """The workload in one association of dcmtk's storescu."""
    subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            SCANNER,
            "-aec",
            appliance.ae_title,
            appliance.dimse_host,
            str(appliance.dimse_port),
            *map(str, workload.files),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def console_config(tmp_path: Path, *, forward: bool = False, **environ: str) -> Config:
    """A configuration in *tmp_path* with a free DIMSE port; *forward*: one
    ``[[forward]]`` destination ``upstream`` (no worker runs in these tests,
    so its entries wait in the outbox)."""
    path = tmp_path / "appliance.toml"
    text = ""
    if forward:
        # a port nothing listens on: the destination is never reached
        text += f'[[forward]]\nname = "upstream"\nurl = "http://127.0.0.1:{free_port()}/dicomweb"\n'
    path.write_text(text)
    env = {
        "APPLIANCE_STORAGE_PATH": str(tmp_path / "blobs"),
        "APPLIANCE_INDEX_URL": f"sqlite:///{tmp_path / 'index.db'}",
        "APPLIANCE_AUDIT_PATH": str(tmp_path / "audit"),
        "APPLIANCE_DIMSE_PORT": str(free_port()),
        # one listener runs in this process: the one the health check looks for
        "APPLIANCE_DIMSE_WORKERS": "1",
        **environ,
    }
    return load_config(path, environ=env, cwd=tmp_path)


def run_appliance(config: Config, tmp_path: Path) -> Iterator[LiveAppliance]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    yield from started_appliance(config, run_dir)


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[LiveAppliance]:
    """An anonymous-mode appliance (loopback), as ``make run`` starts it."""
    yield from run_appliance(console_config(tmp_path), tmp_path)


@pytest.fixture
def workload(tmp_path: Path, appliance: LiveAppliance) -> Workload:
    work = build_workload(tmp_path / "workload")
    send(appliance, work)
    return work


def text_of(page: Any, selector: str) -> str:
    return str(page.locator(selector).first.inner_text()).strip()


def wait_for_thumbnails(page: Any) -> list[str]:
    """Wait until every thumbnail of the page has loaded; their URLs."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.thumb')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
        timeout=30_000,
    )
    sources = page.eval_on_selector_all("img.thumb", "images => images.map(i => i.src)")
    return [str(s) for s in sources]


# --------------------------------------------------------------------------
# anonymous mode: the pages and the actions


def test_dashboard_shows_the_workload(appliance: LiveAppliance, workload: Workload) -> None:
    with chromium() as browser:
        page = browser.new_page()
        response = page.goto(appliance.base_url + "/")
        assert response is not None
        assert response.status == 200
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        # the numbers are those of the workload
        assert text_of(page, "#received-total") == str(workload.instances)
        assert text_of(page, "#index-instances") == str(workload.instances)
        assert text_of(page, "#index-studies") == "2"
        assert text_of(page, "#index-series") == "2"
        legend = page.locator("#received .legend-item")
        assert legend.count() == 1
        assert legend.first.inner_text().strip() == f"{SCANNER} (dimse): {workload.instances}"
        # one bar segment for the current hour, labelled with the count
        bars = page.locator("#received svg rect")
        assert bars.count() == 1
        assert str(bars.first.locator("title").text_content()).endswith(
            f"{SCANNER} (dimse): {workload.instances}"
        )
        # every dependency healthy: the index, the storage, the DIMSE listener
        states = dict(
            zip(
                page.locator("#health tr[data-check] td:first-child").all_inner_texts(),
                page.locator("#health tr[data-check] td:nth-child(2)").all_inner_texts(),
                strict=True,
            )
        )
        assert states["index"] == states["storage"] == states["dimse"] == "ok", states
        assert text_of(page, "#fhir .big") == "off"
        # no script error on the page (CSP would refuse an inline one)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.reload()
        assert not errors
        screenshot(page, "dashboard", full_page=True)
        # the page takes in what arrives next by itself (no reload)
        extra = build_workload(workload.files[0].parent.parent / "more")
        send(appliance, dataclasses.replace(extra, files=extra.files[:1]))
        page.wait_for_function(
            "() => document.getElementById('received-total').textContent.trim() === '6'",
            timeout=40_000,
            polling=500,
        )
        assert text_of(page, "#index-instances") == "6"
        assert not errors


def test_dashboard_lists_the_association(appliance: LiveAppliance, workload: Workload) -> None:
    """The storescu association, once the association log has it."""
    with chromium() as browser:
        page = browser.new_page()
        # the log is written by a background thread of the listener: a
        # second or so after the association ends
        for _ in range(20):
            page.goto(appliance.base_url + "/")
            if page.locator("#associations td.calling").count():
                break
            time.sleep(1)
        row = page.locator("#associations tbody tr").first
        assert row.locator("td.calling").inner_text().strip() == SCANNER
        assert row.locator("td.outcome").inner_text().strip() == "released"
        assert row.locator("td.stored").inner_text().strip() == str(workload.instances)


def test_study_list_finds_a_study_by_patient_name(
    appliance: LiveAppliance, workload: Workload
) -> None:
    with chromium() as browser:
        page = browser.new_page()
        page.goto(appliance.base_url + "/console/studies")
        assert page.locator("#studies tbody tr").count() == 2
        # a prefix of the name, in any case (PS3.4 C.2.2.2.1 for PN)
        page.fill("input[name=patient]", "console^al")
        page.click("#study-search button[type=submit]")
        page.wait_for_url("**/console/studies?*")
        rows = page.locator("#studies tbody tr")
        assert rows.count() == 1
        assert rows.first.locator("a.patient").inner_text().strip() == "Console, Alice"
        assert "ACC-100" in rows.first.inner_text()
        screenshot(page, "studies")
        # a wild card, and the other filters
        page.goto(appliance.base_url + "/console/studies?patient=*bob")
        assert page.locator("#studies a.patient").all_inner_texts() == ["Console, Bob"]
        page.goto(appliance.base_url + "/console/studies?modality=mr&from=2024-03-01")
        assert page.locator("#studies a.patient").all_inner_texts() == ["Console, Bob"]
        page.goto(appliance.base_url + "/console/studies?accession=ACC-1*&to=2024-01-31")
        assert page.locator("#studies a.patient").all_inner_texts() == ["Console, Alice"]
        page.goto(appliance.base_url + "/console/studies?patient=nobody")
        assert text_of(page, "#studies td.empty") == "No study matches."
        # a bad date is a clear message, not a crash
        response = page.goto(appliance.base_url + "/console/studies?from=2024-02-30")
        assert response is not None
        assert response.status == 400
        assert "from: not a date" in text_of(page, "#search-error")


def test_study_page_shows_real_thumbnails(appliance: LiveAppliance, workload: Workload) -> None:
    with chromium() as browser:
        page = browser.new_page()
        page.goto(appliance.base_url + "/console/studies?patient=Console^Alice")
        page.click("#studies a.patient")
        page.wait_for_url(f"**/console/studies/{workload.alice}")
        assert text_of(page, "#study-uid") == workload.alice
        sources = wait_for_thumbnails(page)
        assert sources == [
            f"{appliance.base_url}/v1/studies/{workload.alice}"
            f"/series/{workload.series[workload.alice]}/thumbnail"
        ]
        width = page.eval_on_selector("img.thumb", "i => i.naturalWidth")
        assert width > 0
        fetched = page.request.get(sources[0])
        assert fetched.ok
        assert is_real_image(fetched.body())
        # the series' three instances, in instance number order
        numbers = page.locator("table.instances tbody td:first-child").all_inner_texts()
        assert [n.strip() for n in numbers] == ["1", "2", "3"]
        # no viewer installed here: no link to it
        assert page.locator("#open-viewer").count() == 0
        screenshot(page, "study", full_page=True)


def test_delete_asks_first_then_removes_the_study(
    appliance: LiveAppliance, workload: Workload
) -> None:
    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{appliance.base_url}/console/studies/{workload.bob}")
        page.click("#delete")
        page.wait_for_url(f"**/console/studies/{workload.bob}/delete")
        assert "Delete this study?" in text_of(page, "h1")
        # nothing is deleted before the confirmation
        qido = httpx.get(f"{appliance.root}/studies?StudyInstanceUID={workload.bob}")
        assert len(qido.json()) == 1
        screenshot(page, "confirm-delete")
        page.click("#confirm-delete button[type=submit]")
        page.wait_for_url("**/console/studies?deleted=2")
        assert text_of(page, "#deleted-notice") == "Study deleted (2 instances)."
        assert page.locator("#studies a.patient").all_inner_texts() == ["Console, Alice"]
    qido = httpx.get(f"{appliance.root}/studies?StudyInstanceUID={workload.bob}")
    assert qido.status_code == 200
    assert qido.json() == []
    assert httpx.get(f"{appliance.root}/studies/{workload.alice}/metadata").status_code == 200


def test_download_is_the_stored_instances(
    tmp_path: Path, appliance: LiveAppliance, workload: Workload
) -> None:
    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{appliance.base_url}/console/studies/{workload.alice}")
        with page.expect_download() as info:
            page.click("#download")
        download = info.value
        assert download.suggested_filename == f"study-{workload.alice}.zip"
        target = tmp_path / "download.zip"
        download.save_as(str(target))
    series = workload.series[workload.alice]
    with zipfile.ZipFile(target) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert len(names) == 3
        for name in names:
            folder, _, file = name.partition("/")
            assert folder == series
            assert file.endswith(".dcm")
            sop = file.removesuffix(".dcm")
            wado = httpx.get(
                f"{appliance.root}/studies/{workload.alice}/series/{series}/instances/{sop}",
                headers={"Accept": "application/dicom; transfer-syntax=*"},
                timeout=30,
            )
            assert wado.status_code == 200
            assert archive.read(name) == wado.content
            assert dcmread(io.BytesIO(wado.content)).PatientName == "Console^Alice"


def test_retry_parked_forwards(tmp_path: Path) -> None:
    config = console_config(tmp_path, forward=True)
    for appliance in run_appliance(config, tmp_path):
        work = build_workload(tmp_path / "workload")
        send(appliance, work)
        outbox = Outbox(appliance.services.engine)
        claim = outbox.claim("upstream", 100, dt.timedelta(minutes=5))
        assert claim is not None
        assert len(claim.entries) == work.instances
        reason = "the upstream refused it: failure reason 0xA900 (43264)"
        outbox.park(claim.token, [e.id for e in claim.entries], reason)
        with chromium() as browser:
            page = browser.new_page()
            page.goto(appliance.base_url + "/")
            row = page.locator("#forwarding tr[data-destination=upstream]")
            assert row.locator("td.parked").inner_text().strip() == str(work.instances)
            assert reason in row.inner_text()
            screenshot(page, "dashboard-parked", full_page=True)
            row.locator("form.retry button").click()
            page.wait_for_url("**/?requeued=*")
            assert text_of(page, "#requeued-notice") == (
                f"{work.instances} parked entries of upstream queued again."
            )
            row = page.locator("#forwarding tr[data-destination=upstream]")
            assert row.locator("td.parked").inner_text().strip() == "0"
            assert row.locator("td.pending").inner_text().strip() == str(work.instances)
            assert row.locator("form.retry").count() == 0
        (status,) = outbox.status(["upstream"])
        assert (status.parked, status.queued) == (0, work.instances)


# --------------------------------------------------------------------------
# token mode: login, cookie, roles, CSRF


def test_token_mode_login_cookie_roles_and_csrf(tmp_path: Path) -> None:
    config = console_config(tmp_path, forward=True, APPLIANCE_AUTH_MODE="token")
    for appliance in run_appliance(config, tmp_path):
        work = build_workload(tmp_path / "workload")
        send(appliance, work)
        tokens = ApiTokens(appliance.services.engine)
        admin, _ = tokens.create(["admin"], name="console admin")
        reader, _ = tokens.create(["read"], name="console reader")
        base = appliance.base_url
        study_url = f"{base}/console/studies/{work.alice}"
        with chromium() as browser:
            page = browser.new_page()
            # signed out: every page leads to the login page, the API says 401
            page.goto(study_url)
            assert page.url == f"{base}/console/login?next=/console/studies/{work.alice}"
            screenshot(page, "login")
            assert httpx.get(f"{appliance.root}/studies").status_code == 401
            # a wrong token is refused on the page
            page.fill("#token", "dap_000000000000_" + "A" * 43)
            page.click("section.login button[type=submit]")
            assert "is unknown" in text_of(page, "#login-error")
            assert not browser.cookies()

            # admin: back to the page asked for; thumbnails through the cookie
            page.fill("#token", admin)
            page.click("section.login button[type=submit]")
            page.wait_for_url(study_url)
            (cookie,) = browser.cookies()
            assert cookie["name"] == "appliance_session"
            assert cookie["httpOnly"] is True
            assert cookie["sameSite"] == "Strict"
            assert cookie["path"] == "/"
            assert cookie["secure"] is False  # plain HTTP on loopback
            assert 0 < cookie["expires"] - dt.datetime.now().timestamp() <= 8 * 3600 + 60
            assert not page.evaluate("document.cookie")  # HttpOnly: no script reads it
            sources = wait_for_thumbnails(page)
            assert is_real_image(page.request.get(sources[0]).body())
            assert page.locator("#delete").count() == 1
            page.goto(base + "/")
            assert text_of(page, "#index-instances") == str(work.instances)
            # DICOMweb through the cookie: reads, and a DELETE with the CSRF header
            assert page.request.get(f"{appliance.root}/studies").ok
            delete_bob = f"{appliance.root}/studies/{work.bob}"
            assert page.request.delete(delete_bob).status == 403
            header = {"X-CSRF-Token": csrf_token(admin)}
            assert page.request.delete(delete_bob, headers=header).status == 204
            # a console action without its CSRF token, or with another's
            retry = f"{base}/console/forward/upstream/retry"
            assert page.request.post(retry, form={"x": "1"}).status == 403
            wrong = {CSRF_FIELD: csrf_token(reader)}
            assert page.request.post(retry, form=wrong).status == 403
            right = {CSRF_FIELD: csrf_token(admin)}
            assert page.request.post(retry, form=right, max_redirects=0).status == 303
            # signed out: the cookie is gone, pages lead to the login page again
            page.click("header form button")
            page.wait_for_url(f"{base}/console/login")
            assert not browser.cookies()
            page.goto(base + "/console/studies")
            assert page.url.startswith(f"{base}/console/login")

            # read: the pages, not the actions
            page.fill("#token", reader)
            page.click("section.login button[type=submit]")
            page.wait_for_url(f"{base}/console/studies")
            assert page.locator("#studies a.patient").all_inner_texts() == ["Console, Alice"]
            page.goto(base + "/")  # the dashboard is for readers too
            assert text_of(page, "#index-instances") == str(work.instances - 2)
            page.goto(study_url)
            wait_for_thumbnails(page)
            assert page.locator("#delete").count() == 0
            assert page.locator("#download").count() == 0
            download = page.request.get(f"{study_url}/download")
            assert download.status == 403
            response = page.goto(f"{study_url}/delete")
            assert response is not None
            assert response.status == 403
            assert "lacks the admin permission" in text_of(page, "#error-message")
            csrf = {CSRF_FIELD: csrf_token(reader)}
            delete = page.request.post(f"{study_url}/delete", form={**csrf, "confirm": work.alice})
            assert delete.status == 403
            assert page.request.post(retry, form=csrf).status == 403
        # Alice's study is still there
        qido = httpx.get(
            f"{appliance.root}/studies",
            headers={"Authorization": f"Bearer {reader}"},
        )
        assert [s["0020000D"]["Value"][0] for s in qido.json()] == [work.alice]
