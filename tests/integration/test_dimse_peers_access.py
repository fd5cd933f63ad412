"""Per-peer DIMSE access (``[[dimse.peers]]`` ``services`` and
``addresses``, ``dimse.unknown_peer_services``) against dcmtk's tools and
pynetdicom as the requestors.

A service a peer may not use is answered 0x0124 "Refused: Not Authorized"
(PS3.7 Annex C.5) without running; an address outside the peer's networks is
rejected before negotiation (A-ASSOCIATE-RJ, reason 3).  Each refusal is one
WARNING line naming the AE title, the address and the service.
"""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from appliance.model import Origin
from appliance.status import Status
from tests.conftest import LiveAppliance, appliance_config, dcmtk, started_appliance
from tests.integration.test_dimse_retrieve import storescp
from tests.integration.test_dimse_store import count_instances, ct_dataset, write_part10
from tests.peers import free_port

pytestmark = pytest.mark.integration

#: How dcmtk 3.6.7 prints a status it has no name for (0x0124 among them).
DCMTK_0124 = "Unknown Status: 0x124"
#: The peers of the module's appliance: title -> (services, addresses).
PEERS: dict[str, tuple[list[str] | None, list[str]]] = {
    "EVERYTHING": (None, []),
    "NOFIND": (["echo", "store", "move", "get", "commitment"], []),
    "NOSTORE": (["echo", "find"], []),
    "NOECHO": (["store", "find"], []),
    "NOMOVE": (["echo", "find", "get"], []),
    "NOGET": (["echo", "find", "move"], []),
    "NOCOMMIT": (["echo", "store"], []),
    "FARNET": (None, ["10.0.0.0/8"]),
    "NEARNET": (["echo"], ["192.0.2.0/24", "127.0.0.0/8"]),
}


def _peer(title: str, port: int, services: list[str] | None, addresses: list[str]) -> str:
    entry = f'ae_title="{title}", host="127.0.0.1", port={port}'
    if services is not None:
        entry += ", services=[" + ", ".join(f'"{s}"' for s in services) + "]"
    if addresses:
        entry += ", addresses=[" + ", ".join(f'"{a}"' for a in addresses) + "]"
    return "{" + entry + "}"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveAppliance, int, str]]:
    """One appliance: the peers above, the Move Destination DEST, and
    callers with other titles allowed C-ECHO only.  One study stored."""
    dest_port = free_port()
    entries = [_peer(title, 104, *rule) for title, rule in PEERS.items()]
    entries.append(_peer("DEST", dest_port, ["echo"], []))
    config = appliance_config(
        tmp_path_factory.mktemp("access"),
        APPLIANCE_DIMSE_PEERS="[" + ", ".join(entries) + "]",
        APPLIANCE_DIMSE_UNKNOWN_PEER_SERVICES="echo",
    )
    for live in started_appliance(config):
        study = generate_uid()
        ds = ct_dataset(study_uid=study)
        data = io.BytesIO()
        ds.save_as(data, enforce_file_format=True)
        data.seek(0)
        result = live.services.ingest.store_part10(data, Origin("dimse", calling_ae="SETUP"))
        assert result.status is Status.SUCCESS, result.reason
        yield live, dest_port, study


def run(args: list[str]) -> tuple[int, str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stdout + done.stderr


def echoscu(live: LiveAppliance, aet: str) -> tuple[int, str]:
    return run(
        [
            dcmtk("echoscu"),
            "-v",
            "-aet",
            aet,
            "-aec",
            live.ae_title,
            "127.0.0.1",
            str(live.dimse_port),
        ]
    )


def findscu(live: LiveAppliance, aet: str, study: str) -> tuple[int, str]:
    return run(
        [
            dcmtk("findscu"),
            "-v",
            "-S",
            "-aet",
            aet,
            "-aec",
            live.ae_title,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(live.dimse_port),
        ]
    )


def storescu(live: LiveAppliance, aet: str, file: Path) -> tuple[int, str]:
    return run(
        [
            dcmtk("storescu"),
            "-v",
            "-aet",
            aet,
            "-aec",
            live.ae_title,
            "127.0.0.1",
            str(live.dimse_port),
            str(file),
        ]
    )


def movescu(live: LiveAppliance, aet: str, study: str, destination: str = "DEST") -> str:
    return run(
        [
            dcmtk("movescu"),
            "-v",
            "-S",
            "-aet",
            aet,
            "-aec",
            live.ae_title,
            "-aem",
            destination,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(live.dimse_port),
        ]
    )[1]


def getscu(live: LiveAppliance, aet: str, study: str, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    return run(
        [
            dcmtk("getscu"),
            "-v",
            "-S",
            "-aet",
            aet,
            "-aec",
            live.ae_title,
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(live.dimse_port),
        ]
    )[1]


def refusal_logged(caplog: pytest.LogCaptureFixture, command: str, aet: str) -> bool:
    return any(
        record.levelno == logging.WARNING
        and f"{command} from AE '{aet}' at 127.0.0.1:" in record.getMessage()
        and "refused (0x0124 Not Authorized)" in record.getMessage()
        for record in caplog.records
    )


# --------------------------------------------------------------------------
# services


def test_peer_without_find_gets_0124_from_findscu(
    app: tuple[LiveAppliance, int, str], caplog: pytest.LogCaptureFixture
) -> None:
    live, _, study = app
    caplog.set_level(logging.WARNING, logger="dimse_bridge.access")
    code, out = findscu(live, "NOFIND", study)
    # findscu reports the final status and exits 0 (the C-FIND itself ran)
    assert "Received Final Find Response (Unknown Status: 0x124)" in out, out
    assert "Find Response: 1" not in out
    assert refusal_logged(caplog, "C-FIND", "NOFIND")
    # the same query by a peer allowed it finds the study
    code, out = findscu(live, "EVERYTHING", study)
    assert code == 0, out
    assert study in out


def test_peer_without_store_is_refused_and_nothing_is_stored(
    app: tuple[LiveAppliance, int, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live, _, _ = app
    caplog.set_level(logging.WARNING, logger="dimse_bridge.access")
    before = count_instances(live)
    file = write_part10(ct_dataset(), tmp_path / "one.dcm")
    code, out = storescu(live, "NOSTORE", file)
    assert "Received Store Response (Unknown Status: 0x124)" in out, out
    assert count_instances(live) == before
    assert refusal_logged(caplog, "C-STORE", "NOSTORE")
    code, out = storescu(live, "EVERYTHING", file)
    assert code == 0, out
    assert count_instances(live) == before + 1


def test_peer_without_echo_gets_0124_from_echoscu(app: tuple[LiveAppliance, int, str]) -> None:
    live, _, _ = app
    _, out = echoscu(live, "NOECHO")
    assert "Received Echo Response (Unknown Status: 0x124)" in out, out
    assert echoscu(live, "NOSTORE")[0] == 0


def test_peer_without_move_gets_0124_and_nothing_is_sent(
    app: tuple[LiveAppliance, int, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live, dest_port, study = app
    caplog.set_level(logging.WARNING, logger="dimse_bridge.access")
    with storescp(dest_port, tmp_path / "out") as out:
        log = movescu(live, "NOMOVE", study)
        assert "Received Final Move Response (Unknown Status: 0x124)" in log, log
        assert not list(out.iterdir())
        assert refusal_logged(caplog, "C-MOVE", "NOMOVE")
        # allowed: delivered
        log = movescu(live, "NOGET", study)
        assert "Received Final Move Response (Success)" in log, log
        assert len(list(out.iterdir())) == 1


def test_peer_without_get_gets_0124(
    app: tuple[LiveAppliance, int, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live, _, study = app
    caplog.set_level(logging.WARNING, logger="dimse_bridge.access")
    log = getscu(live, "NOGET", study, tmp_path / "refused")
    # getscu then fails to release: pynetdicom 3 sends the Failed SOP
    # Instance UID List after a failure status, which getscu does not read
    assert "Received C-GET Response (Unknown Status: 0x124)" in log, log
    assert "Number of Failed Suboperations    : 1" in log, log
    assert not list((tmp_path / "refused").iterdir())
    assert refusal_logged(caplog, "C-GET", "NOGET")
    log = getscu(live, "NOMOVE", study, tmp_path / "allowed")
    assert len(list((tmp_path / "allowed").iterdir())) == 1, log


def test_pynetdicom_get_and_commitment_refusals(app: tuple[LiveAppliance, int, str]) -> None:
    """pynetdicom shows the statuses as numbers: C-GET final 0x0124 with one
    failed sub-operation; N-ACTION (Storage Commitment) 0x0124."""
    live, _, study = app
    ae = AE(ae_title="NOCOMMIT")
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", live.dimse_port, ae_title=live.ae_title)
    assert assoc.is_established
    try:
        info = Dataset()
        info.TransactionUID = generate_uid()
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = generate_uid()
        info.ReferencedSOPSequence = [item]
        status, _reply = assoc.send_n_action(
            info, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )
        assert status.Status == Status.NOT_AUTHORIZED
        assert "not authorized" in status.ErrorComment
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
        final = responses[-1][0]
        assert final.Status == Status.NOT_AUTHORIZED
        assert final.NumberOfFailedSuboperations == 1
        # C-ECHO is allowed on the same association
        assert assoc.send_c_echo().Status == Status.SUCCESS
    finally:
        assoc.release()


# --------------------------------------------------------------------------
# unknown callers, addresses


def test_unknown_caller_gets_unknown_peer_services(
    app: tuple[LiveAppliance, int, str], tmp_path: Path
) -> None:
    """dimse.unknown_peer_services = ["echo"]: a title not in the peers may
    echo, and nothing else."""
    live, _, study = app
    assert echoscu(live, "STRANGER")[0] == 0
    before = count_instances(live)
    _, out = storescu(live, "STRANGER", write_part10(ct_dataset(), tmp_path / "x.dcm"))
    assert DCMTK_0124 in out, out
    assert count_instances(live) == before
    _, out = findscu(live, "STRANGER", study)
    assert DCMTK_0124 in out, out


def test_address_outside_the_peers_networks_is_rejected(
    app: tuple[LiveAppliance, int, str], caplog: pytest.LogCaptureFixture
) -> None:
    """FARNET may call from 10.0.0.0/8 only: from 127.0.0.1 its association
    is rejected before negotiation, reason 3; NEARNET (127.0.0.0/8 listed)
    is accepted."""
    live, _, _ = app
    caplog.set_level(logging.WARNING, logger="dimse_bridge.handlers")
    code, out = echoscu(live, "FARNET")
    assert code != 0, out
    assert "Calling AE Title Not Recognized" in out, out
    assert any(
        "association rejected: calling AE 'FARNET'" in r.getMessage()
        and "not allowed from 127.0.0.1" in r.getMessage()
        for r in caplog.records
    )
    code, out = echoscu(live, "NEARNET")
    assert code == 0, out


def test_require_known_peers_and_check_peer_address_reject(tmp_path: Path) -> None:
    """require_known_peers: unknown titles get reason 3 from pynetdicom;
    check_peer_address: a peer without addresses whose host is another
    machine is rejected (reason 3) instead of aborted after acceptance."""
    config = appliance_config(
        tmp_path,
        APPLIANCE_DIMSE_REQUIRE_KNOWN_PEERS="true",
        APPLIANCE_DIMSE_CHECK_PEER_ADDRESS="true",
        APPLIANCE_DIMSE_PEERS=(
            '[{ae_title="FAR", host="192.0.2.1", port=104},'
            ' {ae_title="NEAR", host="127.0.0.1", port=104, services=["echo"]}]'
        ),
    )
    for live in started_appliance(config):
        code, out = echoscu(live, "FAR")
        assert code != 0
        assert "Calling AE Title Not Recognized" in out, out
        code, out = echoscu(live, "UNKNOWN")
        assert "Calling AE Title Not Recognized" in out, out
        assert echoscu(live, "NEAR")[0] == 0
        # DICOMweb is untouched by DIMSE rules
        assert httpx.get(f"{live.base_url}/health/live").status_code == 200
