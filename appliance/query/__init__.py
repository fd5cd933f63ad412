"""The shared query layer: hierarchical search of the index for QIDO-RS
(PS3.18 10.6) and C-FIND (PS3.4 C.4.1).

Matching follows PS3.4 C.2.2.2 (Single Value, List of UID, Universal, Wild
Card and Range Matching; see :mod:`appliance.query.matching`).  Out of scope:
Sequence Matching (C.2.2.2.6), Empty Value Matching (C.2.2.2.7), combined
date-time matching and fuzzy semantic matching of person names (both need
Extended Negotiation).  The attributes that can be matched and returned are
those of the one keyword table in :mod:`appliance.query.keys`.
"""

from appliance.query.keys import MATCHING_KEYS, RETURN_KEYS
from appliance.query.service import Query, QueryResult, QueryService

__all__ = ["MATCHING_KEYS", "RETURN_KEYS", "Query", "QueryResult", "QueryService"]
