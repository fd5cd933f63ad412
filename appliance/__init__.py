"""dicom-appliance core: configuration, storage, index, ingest and query.

The core knows neither HTTP nor DIMSE; the protocol edges (``dicomweb`` and
``dimse_bridge``) translate their wire formats into calls on these services.
"""

__version__ = "0.1.0"
