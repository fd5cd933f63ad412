"""The appliance next to Orthanc: one server after the other on one corpus.

For each server, in this order:

1. fill its index: 10,000 studies of one small instance each by STOW-RS
   (50 per request, 2 clients: the quickest honest way for both servers,
   each instance acknowledged in the response and verified later), plus
   the study that WADO-RS retrieves (~60 CT instances) and the study C-MOVE
   moves (100 CT instances) by ``storescu``;
2. the ingest runs, each on fresh instances (no server sees an instance
   twice): C-STORE and STOW-RS of CT and of small instances in each
   configuration, the repetitions interleaved;
3. verification: QIDO-RS must find every study sent with as many instances
   as were sent to it, and a sample retrieved by WADO-RS must be the bytes
   sent (see :func:`verify`);
4. QIDO-RS and C-FIND latencies, WADO-RS retrieves, C-MOVE.

A sampler thread reads the RSS of the server's whole process tree every
100 ms (and its PSS every second) from start to stop;
``peak_rss_ingest_mb`` is the peak of the RSS sum over steps 1 and 2.
Each figure is the median over the repetitions (a latency's p50 and p95
are taken within each repetition first).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import dicomweb, dimse
from bench.corpus import (
    Instance,
    InstanceSet,
    StudyAttributes,
    dataset_part,
    study_attributes,
    uid,
)
from bench.servers import Peer, RssSampler, Server, free_port

CT, SMALL = 512, 64
#: DICOM JSON tags (PS3.18 F.2) of the UIDs QIDO-RS answers are checked on
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
INSTANCE_COUNT = "00201208"  # NumberOfStudyRelatedInstances
NAME_PREFIX = "SMI"  # PatientName=SMI* matches the SMITHs
DATE_RANGE = ("20150101", "20151231")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    reps: int = 3
    fill_studies: int = 10_000
    ct: int = 200  # CT instances per ingest run
    small: int = 500  # small instances per ingest run
    wado_study: int = 60
    move_study: int = 100
    queries: int = 50  # QIDO-RS searches per query and repetition
    cfind_queries: int = 40  # C-FINDs per query and repetition
    retrieves: int = 10  # WADO-RS instance and metadata calls per repetition
    study_retrieves: int = 2  # whole-study retrieves per repetition
    #: the matches one query returns at most: QIDO-RS ``limit``, and each
    #: server's cap on C-FIND matches
    limit: int = 100
    seed: str = "dicom-appliance-bench-1"

    @classmethod
    def quick(cls, reps: int) -> Plan:
        """Small counts, for a smoke run of every code path."""
        return cls(
            reps=reps,
            fill_studies=300,
            ct=24,
            small=120,
            wado_study=12,
            move_study=10,
            queries=10,
            cfind_queries=10,
            retrieves=3,
            study_retrieves=1,
        )


@dataclasses.dataclass(frozen=True)
class IngestRun:
    """One ingest configuration of one repetition."""

    protocol: str  # "cstore" or "stow"
    kind: str  # "ct" or "small"
    parallel: int  # associations or clients
    per_request: int  # STOW-RS instances per request (1 for C-STORE)
    instances: InstanceSet

    @property
    def key(self) -> str:
        if self.protocol == "cstore":
            return f"cstore_{self.kind}_{self.parallel}assoc_per_s"
        return f"stow_{self.kind}_{self.per_request}per_request_{self.parallel}clients_per_s"


@dataclasses.dataclass
class Corpus:
    """Every instance set of one run, and the folder its C-STORE files are in."""

    plan: Plan
    folder: Path
    fill: InstanceSet
    wado: InstanceSet
    move: InstanceSet
    runs: list[IngestRun]
    #: matching studies by query keys (see :func:`matching_studies`)
    expected: dict[tuple[tuple[str, str], ...], frozenset[str]] = dataclasses.field(
        default_factory=dict
    )

    @classmethod
    def build(cls, plan: Plan, folder: Path, parts: set[str]) -> Corpus:
        def instance_set(name: str, size: int, count: int, per_study: int = 100) -> InstanceSet:
            return InstanceSet(name, size, count, per_study, plan.seed)

        runs = []
        for rep in range(plan.reps):
            for kind, size, count in (("ct", CT, plan.ct), ("small", SMALL, plan.small)):
                if "dimse" in parts:
                    for assoc in (1, 4):
                        name = f"cstore-{kind}-{assoc}assoc-{rep}"
                        runs.append(
                            IngestRun("cstore", kind, assoc, 1, instance_set(name, size, count))
                        )
                if "dicomweb" in parts:
                    for per_request in (1, 50):
                        for clients in (1, 4):
                            name = f"stow-{kind}-{per_request}per-{clients}clients-{rep}"
                            runs.append(
                                IngestRun(
                                    "stow",
                                    kind,
                                    clients,
                                    per_request,
                                    instance_set(name, size, count),
                                )
                            )
        corpus = cls(
            plan,
            folder,
            fill=instance_set("fill", SMALL, plan.fill_studies, per_study=1),
            wado=instance_set("wado-study", CT, plan.wado_study, per_study=plan.wado_study),
            move=instance_set("move-study", CT, plan.move_study, per_study=plan.move_study),
            runs=runs,
        )
        for instances in (corpus.fill, corpus.wado, corpus.move, *(r.instances for r in runs)):
            instances.check()
        # storescu sends files: write those sets (STOW-RS bodies are rendered
        # in memory before each run)
        for instances in (corpus.wado, corpus.move):
            instances.write(folder)
        for run in runs:
            if run.protocol == "cstore":
                run.instances.write(folder)
        return corpus

    def paths(self, instances: InstanceSet) -> list[Path]:
        return instances.write(self.folder)

    @functools.cached_property
    def stored_studies(self) -> dict[str, StudyAttributes]:
        """The attributes of every study the servers get, by UID."""
        return {
            study: study_attributes(study)
            for instances, _ in stored_sets(self)
            for study in instances.studies
        }


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentiles(times: list[float]) -> tuple[float, float]:
    """p50 and p95 (nearest rank) of *times*."""
    ordered = sorted(times)
    p95 = ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]
    return statistics.median(ordered), p95


class Figures:
    """The values of one server: every repetition's, and their medians."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def add_latencies(self, key: str, times: list[float]) -> None:
        p50, p95 = percentiles(times)
        self.add(f"{key}_p50_ms", p50)
        self.add(f"{key}_p95_ms", p95)

    def medians(self) -> dict[str, float]:
        return {key: round(median(values), 2) for key, values in self.values.items()}


# --------------------------------------------------------------------------
# ingest


def fill(server: Server, corpus: Corpus, figures: Figures) -> None:
    """The index fill by STOW-RS, 50 instances per request from 2 clients
    (quicker than C-STORE for both servers), then the WADO-RS and C-MOVE
    studies by storescu."""
    count = corpus.fill.count
    bodies = dicomweb.stow_bodies(list(corpus.fill.render()), 2, 50)
    seconds, acknowledged = dicomweb.stow(server, bodies)
    if acknowledged != count:
        raise RuntimeError(f"{server.name}: STOW-RS acknowledged {acknowledged} of {count}")
    figures.add("fill_small_stow_per_s", count / seconds)
    dimse.store(server, corpus.paths(corpus.wado) + corpus.paths(corpus.move), 4)


def ingest(server: Server, corpus: Corpus, figures: Figures) -> None:
    for run in corpus.runs:
        count = run.instances.count
        if run.protocol == "cstore":
            seconds = dimse.store(server, corpus.paths(run.instances), run.parallel)
        else:
            bodies = dicomweb.stow_bodies(
                list(run.instances.render()), run.parallel, run.per_request
            )
            seconds, acknowledged = dicomweb.stow(server, bodies)
            if acknowledged != count:
                raise RuntimeError(
                    f"{server.name}: STOW-RS acknowledged {acknowledged} of {count} instances"
                )
            del bodies
        figures.add(run.key, count / seconds)


# --------------------------------------------------------------------------
# verification


def stored_sets(corpus: Corpus) -> list[tuple[InstanceSet, str]]:
    """Every set the server got, with how (``cstore`` or ``stow``)."""
    return [
        (corpus.fill, "stow"),
        (corpus.wado, "cstore"),
        (corpus.move, "cstore"),
        *((run.instances, run.protocol) for run in corpus.runs),
    ]


def same_bytes(stored: bytes, instance: Instance, protocol: str) -> bool:
    """Whether a retrieved instance is the one sent.

    STOW-RS sends whole Part 10 files, and both servers keep them as sent:
    compared whole.  C-STORE sends only the data set and each receiver
    writes its own File Meta group (Orthanc and the appliance both do):
    compared on the data set, which must be the bytes sent."""
    sent = instance.render()
    if protocol == "stow":
        return stored == sent
    return dataset_part(stored) == dataset_part(sent)


def date_ranges(corpus: Corpus) -> Iterator[tuple[str, str, dict[str, int]]]:
    """(first date, last date, {study: instances sent}) covering every
    stored study, each range holding fewer studies than the query limit.

    Paging through ``/studies`` with ``offset`` would be simpler, but
    Orthanc stops any search at ``LimitFindResults`` (+1) matches whatever
    the offset, and that cap must stay equal to the appliance's C-FIND cap;
    queries that each match less than one page work the same on both."""
    by_date: dict[str, dict[str, int]] = {}
    for instances, _ in stored_sets(corpus):
        for study, members in instances.studies.items():
            day = by_date.setdefault(study_attributes(study).study_date, {})
            day[study] = day.get(study, 0) + len(members)
    dates = sorted(by_date)
    i = 0
    while i < len(dates):
        low, studies = dates[i], dict(by_date[dates[i]])
        if len(studies) >= corpus.plan.limit:
            raise RuntimeError(f"the corpus has {len(studies)} studies on {low}: too many")
        while i + 1 < len(dates) and len(studies) + len(by_date[dates[i + 1]]) < corpus.plan.limit:
            i += 1
            studies |= by_date[dates[i]]
        yield low, dates[i], studies
        i += 1


def verify(server: Server, corpus: Corpus) -> dict[str, int]:
    """Check that the server holds what it acknowledged.

    - QIDO-RS, by StudyDate ranges of fewer matches than a page
      (:func:`date_ranges`), with NumberOfStudyRelatedInstances: exactly the
      studies sent are found, each with as many instances as were sent to
      it (this covers every instance of the run, the index fill included);
    - a sample (2 instances of each set, 10 of the fill) retrieved by WADO-RS
      is byte for byte what was sent (:func:`same_bytes`).

    Raises RuntimeError on the first difference: a run whose figures count
    unverified work fails."""
    rng = random.Random(f"{corpus.plan.seed}/verify")
    checked = {"studies": 0, "instances": 0, "compared": 0}
    with dicomweb.client() as http:
        for low, high, expected in date_ranges(corpus):
            params = {
                "StudyDate": f"{low}-{high}",
                "includefield": INSTANCE_COUNT,
                "limit": str(corpus.plan.limit),
            }
            _ms, matches = dicomweb.qido(http, server, "/studies", params)
            found = {m[STUDY_UID]["Value"][0]: int(m[INSTANCE_COUNT]["Value"][0]) for m in matches}
            if found != expected:
                wrong = sorted(
                    k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k)
                )
                raise RuntimeError(
                    f"{server.name}: QIDO-RS finds {len(found)} studies of {low}-{high} with "
                    f"{sum(found.values())} instances; {len(expected)} studies with "
                    f"{sum(expected.values())} were sent ({len(wrong)} differ, e.g. {wrong[0]}: "
                    f"{found.get(wrong[0])} found, {expected.get(wrong[0])} sent)"
                )
            checked["studies"] += len(found)
            checked["instances"] += sum(found.values())
        for instances, protocol in stored_sets(corpus):
            sample = rng.sample(
                instances.instances, min(10 if instances is corpus.fill else 2, instances.count)
            )
            for instance in sample:
                stored = dicomweb.retrieve_instance(http, server, instance)
                if not same_bytes(stored, instance, protocol):
                    raise RuntimeError(
                        f"{server.name}: instance {instance.sop} of {instances.name} "
                        "was not stored as sent"
                    )
                checked["compared"] += 1
    return checked


# --------------------------------------------------------------------------
# queries


@dataclasses.dataclass(frozen=True)
class StudyQuery:
    """A study-level query: its QIDO-RS and C-FIND keys for call *i*."""

    name: str
    keys: Callable[[int], dict[str, str]]


def study_queries(corpus: Corpus) -> list[StudyQuery]:
    rng = random.Random(f"{corpus.plan.seed}/queries")
    patients = [
        study_attributes(rng.choice(corpus.fill.instances).study).patient_id
        for _ in range(corpus.plan.queries + 1)
    ]
    return [
        StudyQuery("by_patient_id", lambda i: {"PatientID": patients[i % len(patients)]}),
        StudyQuery("by_name_prefix", lambda i: {"PatientName": f"{NAME_PREFIX}*"}),
        StudyQuery("by_date_range", lambda i: {"StudyDate": "-".join(DATE_RANGE)}),
    ]


def matching_studies(corpus: Corpus, keys: dict[str, str]) -> frozenset[str]:
    """Every stored study that matches *keys* (one of the three study queries)."""
    key = tuple(sorted(keys.items()))
    if key not in corpus.expected:
        found = []
        for study, attributes in corpus.stored_studies.items():
            if "PatientID" in keys:
                match = attributes.patient_id == keys["PatientID"]
            elif "PatientName" in keys:
                match = attributes.patient_name.startswith(keys["PatientName"].rstrip("*"))
            else:
                low, high = keys["StudyDate"].split("-")
                match = low <= attributes.study_date <= high
            if match:
                found.append(study)
        corpus.expected[key] = frozenset(found)
    return corpus.expected[key]


def check_matches(
    server: Server, what: str, found: list[str], expected: frozenset[str], limit: int
) -> None:
    """Check a query's answer (the UIDs it returned) against the corpus.

    Every match must be genuine and given once.  If no more than *limit*
    entities match, all must be there.  If more do, each server returns at
    most *limit* of them and says the list is cut (C-FIND: a final status
    other than Success, checked by the caller); Orthanc 1.10 then sometimes
    returns one less than its ``LimitFindResults``, so the bound checked is
    only that at least half the limit came back (the JSON keeps the number
    of matches of every query, for the record)."""
    unique = set(found)
    if len(unique) != len(found) or not unique <= expected:
        raise RuntimeError(
            f"{server.name}: {what} returned {len(found)} matches, "
            f"{len(unique - expected)} of them wrong, {len(found) - len(unique)} repeated"
        )
    if len(expected) <= limit:
        if unique != expected:
            raise RuntimeError(
                f"{server.name}: {what} found {len(unique)} of its {len(expected)} matches"
            )
    elif not limit // 2 <= len(unique) <= limit:
        raise RuntimeError(
            f"{server.name}: {what} returned {len(unique)} matches with a limit of {limit}"
        )


@dataclasses.dataclass(frozen=True)
class Search:
    """One QIDO-RS search: where, with what, the tag of the UIDs it
    returns, and the UIDs that match."""

    path: str
    params: dict[str, str]
    tag: str
    expected: frozenset[str]


def measure_qido(server: Server, corpus: Corpus, figures: Figures) -> None:
    """QIDO-RS latencies; every answer is checked after its clock stops."""
    plan = corpus.plan
    rng = random.Random(f"{plan.seed}/qido")
    fill_studies = [rng.choice(corpus.fill.instances).study for _ in range(plan.queries + 1)]
    wado = corpus.wado.instances[0]
    limit = {"limit": str(plan.limit)}
    searches: dict[str, list[Search]] = {}
    for query in study_queries(corpus):
        searches[query.name] = [
            Search(
                "/studies",
                query.keys(i) | limit,
                STUDY_UID,
                matching_studies(corpus, query.keys(i)),
            )
            for i in range(plan.queries + 1)
        ]
    searches["series_of_study"] = [
        Search(f"/studies/{study}/series", limit, SERIES_UID, frozenset([uid(f"{study}/series")]))
        for study in fill_studies
    ]
    searches["instances_of_series"] = [
        Search(
            f"/studies/{wado.study}/series/{wado.series}/instances",
            limit,
            SOP_UID,
            frozenset(i.sop for i in corpus.wado.instances),
        )
    ] * (plan.queries + 1)
    with dicomweb.client() as http:
        for calls in searches.values():  # warm-up, not timed
            dicomweb.qido(http, server, calls[-1].path, calls[-1].params)
        for _ in range(plan.reps):
            for name, calls in searches.items():
                times = []
                for search in calls[: plan.queries]:
                    ms, matches = dicomweb.qido(http, server, search.path, search.params)
                    times.append(ms)
                    found = [match[search.tag]["Value"][0] for match in matches]
                    check_matches(server, f"QIDO-RS {name}", found, search.expected, plan.limit)
                    figures.add(f"qido_{name}_matches", len(found))
                figures.add_latencies(f"qido_{name}", times)


def measure_cfind(server: Server, corpus: Corpus, figures: Figures) -> None:
    """C-FIND latencies on one association per repetition, and findscu;
    every answer is checked after its clock stops."""
    plan = corpus.plan
    queries = study_queries(corpus)
    for rep in range(plan.reps):
        client = dimse.FindClient(server)
        try:
            if rep == 0:  # warm-up, not timed
                for q in queries:
                    client.find(dimse.study_query(**q.keys(plan.queries)))
            for q in queries:
                times = []
                for i in range(plan.cfind_queries):
                    identifier = dimse.study_query(**q.keys(i))
                    start = time.perf_counter()
                    matches, final = client.find(identifier)
                    times.append((time.perf_counter() - start) * 1000)
                    expected = matching_studies(corpus, q.keys(i))
                    found = [str(match.StudyInstanceUID) for match in matches]
                    check_matches(server, f"C-FIND {q.name}", found, expected, plan.limit)
                    if (final == dimse.SUCCESS) != (len(expected) <= plan.limit):
                        raise RuntimeError(
                            f"{server.name}: C-FIND {q.name} ended with status 0x{final:04X} "
                            f"after {len(found)} of {len(expected)} matches"
                        )
                    figures.add(f"cfind_{q.name}_matches", len(found))
                figures.add_latencies(f"cfind_{q.name}", times)
        finally:
            client.close()
    patient_id = queries[0].keys(0)["PatientID"]
    for _ in range(plan.reps):
        times = dimse.findscu_ms(
            server, [f"PatientID={patient_id}"], max(3, plan.cfind_queries // 5)
        )
        figures.add("findscu_by_patient_id_ms", median(times))


# --------------------------------------------------------------------------
# retrieve


def measure_wado(server: Server, corpus: Corpus, figures: Figures) -> None:
    """WADO-RS: whole study (MB/s), one instance (ms), study metadata (ms);
    each answer checked after its clock stops."""
    plan = corpus.plan
    study = corpus.wado.instances
    rng = random.Random(f"{plan.seed}/wado")
    url = f"{server.root}/studies/{study[0].study}"
    with dicomweb.client() as http:
        ms, response = dicomweb.timed_get(http, f"{url}/metadata", dicomweb.JSON)
        figures.add("wado_metadata_first_ms", ms)
        for _ in range(plan.reps):
            for _ in range(plan.study_retrieves):
                ms, body, content_type = dicomweb.curl_get(url, dicomweb.RETRIEVE_ACCEPT)
                figures.add("wado_study_mb_per_s", len(body) / 1e6 / (ms / 1000))
                parts = dicomweb.split_multipart(body, content_type)
                sent = {dataset_part(i.render()) for i in study}
                if len(parts) != len(study) or {dataset_part(p) for p in parts} != sent:
                    raise RuntimeError(f"{server.name}: study retrieve is not the study sent")
            times = []
            for instance in rng.choices(study, k=plan.retrieves):
                ms, response = dicomweb.timed_get(
                    http, dicomweb.instance_url(server, instance), dicomweb.RETRIEVE_ACCEPT
                )
                times.append(ms)
                parts = dicomweb.split_multipart(response.content, response.headers["content-type"])
                if len(parts) != 1 or not same_bytes(parts[0], instance, "cstore"):
                    raise RuntimeError(f"{server.name}: instance {instance.sop} retrieved altered")
            figures.add("wado_instance_ms", median(times))
            times = []
            for _ in range(plan.retrieves):
                ms, response = dicomweb.timed_get(http, f"{url}/metadata", dicomweb.JSON)
                times.append(ms)
                if len(response.json()) != len(study):
                    raise RuntimeError(
                        f"{server.name}: metadata of {len(response.json())} instances"
                    )
            figures.add("wado_metadata_ms", median(times))


def measure_move(server: Server, corpus: Corpus, figures: Figures, dest_port: int) -> None:
    for _ in range(corpus.plan.reps):
        seconds = dimse.move(server, list(corpus.move.instances), dest_port)
        figures.add("cmove_ct_per_s", corpus.move.count / seconds)


# --------------------------------------------------------------------------


@dataclasses.dataclass
class ServerReport:
    name: str
    version: str
    settings: dict[str, Any]
    figures: dict[str, float]
    repetitions: dict[str, list[float]]
    memory: dict[str, dict[str, float]]
    verified: dict[str, int]
    seconds: dict[str, float]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure_server(
    start: Callable[..., Any], corpus: Corpus, parts: set[str], dest_port: int
) -> ServerReport:
    figures = Figures()
    seconds: dict[str, float] = {}
    peers = (Peer(dimse.DEST, dest_port),)

    def step(name: str, sampler: RssSampler, run: Callable[[], object]) -> None:
        sampler.phase(name)
        begin = time.perf_counter()
        run()
        seconds[name] = round(time.perf_counter() - begin, 1)
        log(f"{server.name}: {name} done in {seconds[name]} s")

    with start(peers=peers, max_results=corpus.plan.limit) as server:
        log(f"{server.name} started: {server.version}")
        verified: dict[str, int] = {}
        with RssSampler(server) as sampler:
            step("fill", sampler, lambda: fill(server, corpus, figures))
            step("ingest", sampler, lambda: ingest(server, corpus, figures))
            step("verify", sampler, lambda: verified.update(verify(server, corpus)))
            if "dicomweb" in parts:
                step("qido", sampler, lambda: measure_qido(server, corpus, figures))
                step("wado", sampler, lambda: measure_wado(server, corpus, figures))
            if "dimse" in parts:
                step("cfind", sampler, lambda: measure_cfind(server, corpus, figures))
                step("cmove", sampler, lambda: measure_move(server, corpus, figures, dest_port))

        def ingest_peak(peaks: dict[str, float]) -> float:
            return round(max(peaks.get("fill", 0.0), peaks.get("ingest", 0.0)), 1)

        result = figures.medians() | {
            "peak_rss_ingest_mb": ingest_peak(sampler.peaks),
            "peak_pss_ingest_mb": ingest_peak(sampler.pss_peaks),
            "peak_rss_whole_run_mb": round(max(sampler.peaks.values()), 1),
        }
        memory = {
            "rss_peak_mb_by_step": {k: round(v, 1) for k, v in sampler.peaks.items()},
            "pss_peak_mb_by_step": {k: round(v, 1) for k, v in sampler.pss_peaks.items()},
        }
        report = ServerReport(
            server.name,
            server.version,
            server.settings,
            result,
            {key: [round(v, 2) for v in values] for key, values in figures.values.items()},
            memory,
            verified,
            seconds,
        )
        stopping = time.perf_counter()
    log(f"{report.name} stopped in {time.perf_counter() - stopping:.1f} s")
    return report


def run(
    plan: Plan, parts: set[str], servers: list[tuple[str, Callable[..., Any]]]
) -> Iterator[ServerReport]:
    """Build the corpus once, then measure each server in turn."""
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        begin = time.perf_counter()
        corpus = Corpus.build(plan, Path(tmp), parts)
        log(f"corpus built in {time.perf_counter() - begin:.1f} s")
        dest_port = free_port()
        for _name, start in servers:
            yield measure_server(start, corpus, parts, dest_port)
