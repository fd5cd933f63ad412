"""What one association did, for its single log line (no patient data)."""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

from appliance import metrics

_ATTRIBUTE = "_appliance_stats"


@dataclasses.dataclass
class AssociationStats:
    """Counts of one association: per DIMSE service and status class, and
    the data set bytes received and sent."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    #: the peer's Calling AE Title as a metrics label (:func:`ae_label`)
    calling_ae: str = "(none)"
    operations: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    bytes_in: int = 0
    bytes_out: int = 0

    def record(self, service: str, outcome: str, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Count one operation of *service* (``C-STORE``...) ending in
        *outcome* (``success``, ``warning``, ``failure``, ``cancel``)."""
        self.operations[f"{service} {outcome}"] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        metrics.DIMSE_OPERATIONS.labels(service, self.calling_ae, outcome).inc()
        if bytes_in:
            metrics.RECEIVED_BYTES.labels("dimse").inc(bytes_in)
        if bytes_out:
            metrics.SENT_BYTES.labels("dimse").inc(bytes_out)

    def count(self, service: str, outcomes: tuple[str, ...] | None = None) -> int:
        """Operations of *service* (``C-STORE``...) counted so far, only
        those ending in one of *outcomes* if given."""
        total = 0
        for key, value in self.operations.items():
            name, _, outcome = key.partition(" ")
            if name == service and (outcomes is None or outcome in outcomes):
                total += value
        return total

    def activity_counts(self) -> dict[str, int]:
        """The counts the association log keeps (:mod:`appliance.activity`):
        C-STOREs stored (success or warning) and failed (failure, refused),
        C-FIND, C-MOVE + C-GET and C-ECHO requests."""
        stored = self.count("C-STORE", ("success", "warning"))
        return {
            "stored": stored,
            "store_failed": self.count("C-STORE") - stored,
            "finds": self.count("C-FIND"),
            "retrieves": self.count("C-MOVE") + self.count("C-GET"),
            "echoes": self.count("C-ECHO"),
        }

    def summary(self) -> str:
        """``C-STORE success 12, C-STORE warning 1; in 6.1 MB, out 0 B; 2.3 s``."""
        operations = ", ".join(f"{k} {v}" for k, v in sorted(self.operations.items()))
        return (
            f"{operations or 'no operations'}; in {_size(self.bytes_in)}, "
            f"out {_size(self.bytes_out)}; {time.monotonic() - self.started:.1f} s"
        )


def stats_of(assoc: Any) -> AssociationStats:
    """The statistics of *assoc* (a pynetdicom Association), made on first use."""
    stats = getattr(assoc, _ATTRIBUTE, None)
    if stats is None:
        stats = AssociationStats(calling_ae=metrics.ae_label(str(assoc.requestor.ae_title)))
        setattr(assoc, _ATTRIBUTE, stats)
    return stats


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover
