"""The one ingest pipeline both protocols call (C-STORE and STOW-RS)."""

from appliance.ingest.pipeline import IngestResult, IngestService
from appliance.ingest.sweep import sweep_orphans

__all__ = ["IngestResult", "IngestService", "sweep_orphans"]
