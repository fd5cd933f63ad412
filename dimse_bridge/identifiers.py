"""Query/Retrieve identifiers (PS3.4 C.4.1.1.3) to and from the query layer.

A C-FIND request identifier names a level and a set of keys; this module
splits it into what :class:`~appliance.query.QueryService` can match and what
each response must carry, and builds the response identifier of one match.
The rules, with the standard's text they follow:

- **Information models** (PS3.4 C.6.1, C.6.2): Patient Root has the levels
  PATIENT, STUDY, SERIES, IMAGE; Study Root has no PATIENT level (its patient
  attributes are study attributes, C.6.2.1), so ``PATIENT`` there is refused.
- **Hierarchical search** (PS3.4 C.4.1.2.1, C.4.1.3.1.1): relational queries
  (C.4.1.2.2.1) are not negotiated, so a query below the top level must give
  the Unique Key of every level above it (Patient Root STUDY: PatientID;
  SERIES: also StudyInstanceUID; IMAGE: also SeriesInstanceUID).  PatientID
  must be a single value; a UID key may also be a List of UIDs (C.2.2.2.2).
- **Keys** (PS3.4 C.2.2.1): a key the query layer can match at the level
  with a non-universal value is a Matching Key; every key given is a Return
  Key and comes back in each response (C.4.1.1.3.2), filled from the match,
  or empty when the index does not hold it.  A key that could not be used
  for matching, or is not held, makes the responses ``0xFF01`` ("one or more
  Optional Keys were not supported for existence and/or matching",
  C.4.1.1.4); its value is then ignored, never guessed.  A key of a level
  below the query level with a value to match is refused (``0xA900``): it is
  not a key of that level (C.4.1.1.3.1, C.6.1.1 and C.6.2.1 tables).
- **Sequence Matching** (PS3.4 C.2.2.2.6) on Request Attributes Sequence
  (one item at most); an empty sequence or an empty item asks for every item
  attribute the index holds.
- **Specific Character Set** (PS3.5 6.1, PS3.4 C.4.1.1.3.1 and C.4.1.1.3.2):
  the request identifier is decoded with its own Specific Character Set and
  matched as Unicode.  A response carries Specific Character Set only when
  one of its values is outside the default repertoire: the request's
  character set if it can encode every value, else ``ISO_IR 192`` (UTF-8).

Reasons of :class:`IdentifierError` name keys and levels, never values
(patient data stays out of ErrorComment and the logs).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from pydicom import config as pydicom_config
from pydicom.charset import custom_encoders, python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from appliance.errors import ApplianceError, QueryError
from appliance.extended_tags import ExtendedTag, values_from_bytes
from appliance.model import Level
from appliance.query import Query, QueryService
from appliance.query.keys import LEVEL_ORDER, REQUEST_ATTRIBUTES, rank
from appliance.query.matching import has_wildcard, is_universal
from appliance.status import Status

#: (0008,0052) Query/Retrieve Level and (0008,0005) Specific Character Set:
#: they steer the query, they are not keys (PS3.4 C.4.1.1.3.1).
QUERY_RETRIEVE_LEVEL: Final = 0x00080052
SPECIFIC_CHARACTER_SET: Final = 0x00080005

#: The Specific Character Set of a response whose values the request's
#: character set cannot encode: ISO_IR 192, UTF-8 (PS3.3 C.12.1.1.2).
UTF8: Final = "ISO_IR 192"

#: Defined Terms of Specific Character Set for the default repertoire (ISO-IR
#: 6, i.e. ASCII; PS3.3 C.12.1.1.2).  pydicom maps them to Latin-1, which is a
#: superset: for deciding what a character set can encode they mean ASCII.
_DEFAULT_TERMS: Final = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})

#: Values of Instance Availability (0008,0056), PS3.3 C.4.23.1.1: every
#: instance the index lists has its blob in the storage.
ONLINE: Final = "ONLINE"

#: Error Comment (0000,0902) is LO, 64 characters at most (PS3.7 Table E.1-1).
ERROR_COMMENT_LENGTH: Final = 64

#: VRs whose text the Specific Character Set governs (PS3.5 6.1.2.3); other
#: string VRs are in the default repertoire.
_TEXT_VRS: Final = frozenset({"SH", "LO", "ST", "LT", "PN", "UC", "UT"})
#: String VRs in which a backslash is text, not a value separator (PS3.5 6.2).
_SINGLE_VALUE_VRS: Final = frozenset({"LT", "ST", "UT", "UR"})
#: VRs written as binary integers.
_BINARY_INT_VRS: Final = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})


class InformationModel(enum.Enum):
    """The Query/Retrieve Information Models served (PS3.4 C.6)."""

    PATIENT_ROOT = "Patient Root"
    STUDY_ROOT = "Study Root"

    @property
    def levels(self) -> tuple[Level, ...]:
        """The model's levels from the top (PS3.4 C.6.1.1, C.6.2.1)."""
        if self is InformationModel.PATIENT_ROOT:
            return LEVEL_ORDER
        return LEVEL_ORDER[1:]


#: SOP Class UID -> information model, for C-FIND, C-MOVE and C-GET
#: (PS3.4 C.6.1.2, C.6.2.2).
MODELS: Final[Mapping[str, InformationModel]] = {
    "1.2.840.10008.5.1.4.1.2.1.1": InformationModel.PATIENT_ROOT,  # FIND
    "1.2.840.10008.5.1.4.1.2.1.2": InformationModel.PATIENT_ROOT,  # MOVE
    "1.2.840.10008.5.1.4.1.2.1.3": InformationModel.PATIENT_ROOT,  # GET
    "1.2.840.10008.5.1.4.1.2.2.1": InformationModel.STUDY_ROOT,  # FIND
    "1.2.840.10008.5.1.4.1.2.2.2": InformationModel.STUDY_ROOT,  # MOVE
    "1.2.840.10008.5.1.4.1.2.2.3": InformationModel.STUDY_ROOT,  # GET
}

#: The Unique Key of each level (PS3.4 C.6.1.1.1, C.6.2.1.1).
UNIQUE_KEYS: Final[Mapping[Level, str]] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

#: Return keys this module fills itself rather than from a match: our AE
#: title, the availability of what the index lists, and (IMAGE level) the
#: stored Transfer Syntax as Available Transfer Syntax UID (0008,3002).
_COMPUTED_KEYS: Final = frozenset(
    {"RetrieveAETitle", "InstanceAvailability", "AvailableTransferSyntaxUID"}
)

#: Attributes of a match that are not attributes of a response identifier:
#: the stored instance's Specific Character Set (a response has its own) and
#: its Transfer Syntax UID, a File Meta element (PS3.4 C.4.1.1.3 Note).
_NOT_RETURNED: Final = frozenset({"SpecificCharacterSet", "TransferSyntaxUID"})


class IdentifierError(ApplianceError):
    """The identifier cannot be used: ``0xA900`` Identifier does not match SOP
    Class (PS3.4 C.4.1.1.4), or ``0xC000`` Unable to process when it cannot
    be decoded at all.

    Attributes
    ----------
    offending
        Tags of the elements at fault, for Offending Element (0000,0901).
    """

    status = Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS

    def __init__(
        self, reason: str, *, status: Status | None = None, offending: Sequence[int] = ()
    ) -> None:
        super().__init__(reason, status=status)
        self.offending = tuple(offending)


@dataclasses.dataclass(frozen=True)
class ReturnKey:
    """One attribute of every response identifier.

    Attributes
    ----------
    tag
        The attribute's tag.
    keyword
        Its PS3.6 keyword.
    vr
        The VR it is written with.
    source
        The key of a match (or of a sequence item) holding its value; None
        when the index does not hold it (returned empty).
    items
        For a sequence: the attributes of each item returned.
    constant
        A value returned as is (the Private Creator of an extended query
        tag's block), instead of one from the match.
    """

    tag: int
    keyword: str
    vr: str
    source: str | None
    items: tuple[ReturnKey, ...] = ()
    constant: str | None = None


@dataclasses.dataclass(frozen=True)
class FindRequest:
    """A C-FIND request identifier, split for the query layer.

    Attributes
    ----------
    model
        The information model of the SOP Class.
    level
        The Query/Retrieve Level.
    keys
        Matching keys for :class:`~appliance.query.Query`: keyword (or
        ``Sequence.Keyword``) -> value in DICOM string form.
    returned
        The attributes of each response, in tag order.
    unsupported
        Names of the keys that were not supported for existence and/or
        matching (the reason for ``0xFF01``).
    character_sets
        The request's Specific Character Set terms; empty for the default
        repertoire.
    extended
        The extended query tags (``ggggeeee``) the responses carry; those
        with a value are in *keys* under the same path.
    """

    model: InformationModel
    level: Level
    keys: Mapping[str, str]
    returned: tuple[ReturnKey, ...]
    unsupported: tuple[str, ...]
    character_sets: tuple[str, ...]
    extended: frozenset[str] = frozenset()

    @property
    def pending_status(self) -> Status:
        """``0xFF01`` if some key was not supported, else ``0xFF00``
        (PS3.4 C.4.1.1.4)."""
        if self.unsupported:
            return Status.PENDING_WITH_UNSUPPORTED_KEYS
        return Status.PENDING

    def query(self) -> Query:
        """The query-layer search for this request (the configured maximum
        of matches), asking only for the attributes its responses carry."""
        return Query(self.level, dict(self.keys), returned=self.sources(), extended=self.extended)

    def sources(self) -> frozenset[str]:
        """The attributes of a match that the response identifiers are
        filled from."""
        found = {key.source for key in self.returned if key.source is not None}
        if "AvailableTransferSyntaxUID" in found:
            found.add("TransferSyntaxUID")
        return frozenset(found)

    def key_names(self) -> list[str]:
        """The keywords requested (for log lines: names, never values)."""
        return [key.keyword for key in self.returned]

    def tags_named(self, reason: str) -> tuple[int, ...]:
        """The tag of the key a query-layer *reason* starts with (its reasons
        begin with the keyword), for Offending Element; empty if none."""
        head = reason.split(":", 1)[0].split(" ", 1)[0]
        for key in self.returned:
            if head == key.keyword or any(head == item.keyword for item in key.items):
                return (key.tag,)
        return ()


# --------------------------------------------------------------------------
# the request


def read_character_sets(identifier: Dataset) -> tuple[str, ...]:
    """The Specific Character Set terms of *identifier* (PS3.3 C.12.1.1.2);
    empty for the default repertoire.

    Raises
    ------
    IdentifierError
        for a term pydicom has no codec for: the values cannot be read.
    """
    value = identifier.get("SpecificCharacterSet")
    if value is None:
        return ()
    terms = [str(term).strip() for term in (value if isinstance(value, MultiValue) else [value])]
    if all(term in _DEFAULT_TERMS for term in terms):
        return ()
    for term in terms:
        if term not in python_encoding:
            raise IdentifierError(
                f"Specific Character Set {_shown(term, 16)} is not supported",
                offending=[SPECIFIC_CHARACTER_SET],
            )
    return tuple(terms)


def read_level(identifier: Dataset, model: InformationModel) -> Level:
    """The Query/Retrieve Level (0008,0052) of *identifier*.

    Raises
    ------
    IdentifierError
        if it is missing, not a level, or not a level of *model* (Study Root
        has no PATIENT level, PS3.4 C.6.2).
    """
    value = identifier.get("QueryRetrieveLevel")
    if isinstance(value, MultiValue):
        raise IdentifierError(
            "QueryRetrieveLevel (0008,0052) must be one value", offending=[QUERY_RETRIEVE_LEVEL]
        )
    text = "" if value is None else str(value).strip()
    if not text:
        raise IdentifierError(
            "QueryRetrieveLevel (0008,0052) is missing or empty",
            offending=[QUERY_RETRIEVE_LEVEL],
        )
    try:
        level = Level(text)
    except ValueError:
        raise IdentifierError(
            f"QueryRetrieveLevel {_shown(text, 16)} is not a level (PS3.4 C.6)",
            offending=[QUERY_RETRIEVE_LEVEL],
        ) from None
    if level not in model.levels:
        raise IdentifierError(
            f"{model.value} has no {level.value} level (PS3.4 C.6.2)",
            offending=[QUERY_RETRIEVE_LEVEL],
        )
    return level


def key_value(value: Any) -> str:
    """An element value in DICOM string form: ``""`` when empty, several
    values joined by backslash (PS3.5 6.4), Person Names with their ``=``
    component groups, numbers as their text."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        raise TypeError("a binary value is not a key")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(key_value(item) for item in value)
    return str(value)


def parse_find(identifier: Dataset, model: InformationModel, service: QueryService) -> FindRequest:
    """Split a C-FIND request *identifier* into matching and return keys.

    Parameters
    ----------
    identifier
        The request identifier as pynetdicom decoded it (values are decoded
        with its Specific Character Set when read).
    model
        The information model of the request's SOP Class.
    service
        The query layer, for the keys it matches and returns per level.

    Raises
    ------
    IdentifierError
        ``0xA900`` for an identifier that does not fit the model (bad level,
        missing Unique Key above the level, a key of a level below with a
        value, a sequence key of several items, an unknown character set);
        ``0xC000`` for one that cannot be decoded.
    """
    try:
        return _Parser(model, service).parse(identifier)
    except IdentifierError:
        raise
    except Exception as exc:
        raise IdentifierError(
            f"the identifier cannot be decoded ({exc.__class__.__name__})",
            status=Status.UNABLE_TO_PROCESS,
        ) from exc


class _Parser:
    """One pass over a request identifier (see :func:`parse_find`)."""

    def __init__(self, model: InformationModel, service: QueryService) -> None:
        self.model = model
        self.service = service
        self.level = model.levels[0]
        self.matchable: frozenset[str] = frozenset()
        self.returnable: frozenset[str] = frozenset()
        self.keys: dict[str, str] = {}
        self.returned: list[ReturnKey] = []
        self.unsupported: list[str] = []
        #: Private Creator of each private block of the identifier
        self.creators: dict[tuple[int, int], str] = {}
        self.extended: set[str] = set()

    def parse(self, identifier: Dataset) -> FindRequest:
        character_sets = read_character_sets(identifier)
        level = read_level(identifier, self.model)
        self.level = level
        self.matchable = self.service.matching_keys(level)
        self.returnable = self.service.return_keys(level) - _NOT_RETURNED
        for element in identifier:
            tag = BaseTag(element.tag)
            if tag.is_private and 0x10 <= tag.element <= 0xFF:
                value = element.value
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
                self.creators[(tag.group, tag.element)] = text.strip(" \0")
        for element in identifier:
            self._element(element)
        self._check_unique_keys()
        return FindRequest(
            model=self.model,
            level=level,
            keys=self.keys,
            returned=tuple(self.returned),
            unsupported=tuple(dict.fromkeys(self.unsupported)),
            character_sets=character_sets,
            extended=frozenset(self.extended),
        )

    def _extended_tag(self, tag: BaseTag, keyword: str) -> ExtendedTag | None:
        """The extended query tag of an identifier's element, or None: by its
        keyword, or for a private element by its group, its Private Creator
        and the low byte of its element number (the block may differ)."""
        registry = self.service.extended
        if registry is None:
            return None
        if not tag.is_private:
            return registry.find(keyword) if keyword else None
        creator = self.creators.get((tag.group, tag.element >> 8))
        if creator is None or tag.element < 0x1000:
            return None
        for candidate in registry.all():
            number = candidate.tag
            if (
                candidate.private_creator == creator
                and number >> 16 == tag.group
                and number & 0xFF == tag.element & 0xFF
            ):
                return candidate
        return None

    def _creator_in_use(self, tag: BaseTag) -> bool:
        """True if the Private Creator element *tag* names the creator of an
        extended query tag of its group."""
        registry = self.service.extended
        creator = self.creators.get((tag.group, tag.element))
        return registry is not None and any(
            found.private_creator == creator and found.tag >> 16 == tag.group
            for found in registry.all()
        )

    def _extended_key(self, tag: BaseTag, element: DataElement, found: ExtendedTag) -> None:
        """An extended query tag as a matching (if it has a value) and
        return key; a tag that cannot be queried now is refused with
        "unable to process" (PS3.4 C.4.1.1.4: 0xC000)."""
        try:
            usable = self.service.extended.resolve(found.path) if self.service.extended else None
        except QueryError as exc:
            raise IdentifierError(
                exc.reason, status=Status.UNABLE_TO_PROCESS, offending=[tag]
            ) from None
        if usable is None:  # deleted meanwhile
            self.unsupported.append(_tag_name(tag))
            return
        value = element.value
        if isinstance(value, bytes | bytearray):
            value = values_from_bytes(bytes(value), usable.vr)
        text = key_value(value)
        if text.strip():
            self.keys[usable.path] = text
        self.extended.add(usable.path)
        self.returned.append(ReturnKey(tag, usable.keyword or usable.path, usable.vr, usable.path))
        if tag.is_private:
            creator_tag = (tag.group << 16) | (tag.element >> 8)
            creator = self.creators[(tag.group, tag.element >> 8)]
            self.returned.append(ReturnKey(creator_tag, "", "LO", None, constant=creator))

    def _element(self, element: DataElement) -> None:
        tag = BaseTag(element.tag)
        if tag.element == 0 or tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET):
            return  # group lengths; the two steering attributes
        if tag.is_private and 0x10 <= tag.element <= 0xFF and self._creator_in_use(tag):
            return  # a Private Creator: returned with its extended query tag
        keyword = keyword_for_tag(tag) if not tag.is_private else ""
        if (
            tag.group >= 0x0008
            and keyword not in self.matchable
            and keyword not in self.returnable
            and element.VR != "SQ"
            and (found := self._extended_tag(tag, keyword)) is not None
        ):
            self._extended_key(tag, element, found)
            return
        if tag.group < 0x0008 or not keyword:
            # PS3.4 C.4.1.1.3 Note: no File Meta elements in an identifier;
            # private and unknown attributes are not held: not returned.
            self.unsupported.append(keyword or _tag_name(tag))
            return
        vr = _writable_vr(element.VR, tag)
        if element.VR == "SQ":
            self._sequence(tag, keyword, element)
            return
        if isinstance(element.value, bytes | bytearray):
            self._not_held(tag, keyword, vr, filtering=False)  # binary: never a key
            return
        value = key_value(element.value)
        filtering = not is_universal(value)
        if keyword in _COMPUTED_KEYS and (
            keyword != "AvailableTransferSyntaxUID" or self.level is Level.IMAGE
        ):
            self.returned.append(ReturnKey(tag, keyword, vr, keyword))
            if filtering:
                self.unsupported.append(keyword)
            return
        if keyword in self.matchable:
            # PS3.4 C.2.2.1: a Matching Key is also a Return Key.
            if value.strip():
                self.keys[keyword] = value
            self.returned.append(ReturnKey(tag, keyword, vr, keyword))
            return
        if keyword in self.returnable:
            self.returned.append(ReturnKey(tag, keyword, vr, keyword))
            if filtering:
                self.unsupported.append(keyword)  # returned, not matched
            return
        self._not_held(tag, keyword, vr, filtering)

    def _not_held(self, tag: int, keyword: str, vr: str, filtering: bool) -> None:
        """A key the index has no value for at this level: returned empty and
        reported by ``0xFF01``; refused if it belongs below the level and
        asks for matching."""
        owner = self._owner(keyword)
        if filtering and owner is not None and rank(owner) > rank(self.level):
            hint = " (see ModalitiesInStudy)" if keyword == "Modality" else ""
            raise IdentifierError(
                f"{keyword} is a {owner.value} key, not of a {self.level.value} query{hint}",
                offending=[tag],
            )
        self.returned.append(ReturnKey(tag, keyword, vr, None))
        self.unsupported.append(keyword)

    def _owner(self, keyword: str) -> Level | None:
        """The top level at which the query layer knows *keyword*."""
        for level in LEVEL_ORDER:
            known = self.service.return_keys(level) | self.service.matching_keys(level)
            if keyword in known or any(key.startswith(f"{keyword}.") for key in known):
                return level
        return None

    def _sequence(self, tag: int, keyword: str, element: DataElement) -> None:
        items: list[Dataset] = list(element.value or [])
        if keyword != REQUEST_ATTRIBUTES or keyword not in self.returnable:
            filtering = any(_has_filter(item) for item in items)
            self._not_held(tag, keyword, "SQ", filtering)
            return
        # PS3.4 C.2.2.2.6 Sequence Matching: "a Sequence of one single Item".
        if len(items) > 1:
            raise IdentifierError(
                f"{keyword} holds {len(items)} items; one at most (PS3.4 C.2.2.2.6)",
                offending=[tag],
            )
        held = sorted(
            (key.split(".", 1)[1] for key in self.matchable if key.startswith(f"{keyword}.")),
            key=lambda name: int(tag_for_keyword(name) or 0),
        )
        sub_keys: list[ReturnKey] = []
        if not items or len(items[0]) == 0:
            # a zero-length sequence or item: every item attribute held
            for name in held:
                sub_tag = int(tag_for_keyword(name) or 0)
                sub_keys.append(ReturnKey(sub_tag, name, dictionary_VR(sub_tag), name))
        else:
            for sub in items[0]:
                sub_keys.extend(self._item_key(keyword, BaseTag(sub.tag), sub, held))
        self.returned.append(ReturnKey(tag, keyword, "SQ", keyword, tuple(sub_keys)))

    def _item_key(
        self, sequence: str, tag: BaseTag, element: DataElement, held: Sequence[str]
    ) -> list[ReturnKey]:
        keyword = keyword_for_tag(tag) if not tag.is_private else ""
        if tag.element == 0 or tag == SPECIFIC_CHARACTER_SET:
            return []
        if not keyword or element.VR == "SQ" or isinstance(element.value, bytes | bytearray):
            self.unsupported.append(f"{sequence}.{keyword or _tag_name(tag)}")
            return []
        value = key_value(element.value)
        path = f"{sequence}.{keyword}"
        vr = _writable_vr(element.VR, tag)
        if keyword in held:
            if value.strip():
                self.keys[path] = value
            return [ReturnKey(tag, keyword, vr, keyword)]
        self.unsupported.append(path)
        return [ReturnKey(tag, keyword, vr, None)]

    def _check_unique_keys(self) -> None:
        """PS3.4 C.4.1.2.1 (baseline, hierarchical): the Unique Key of each
        level above the query level, with a single value (a UID key may be a
        List of UIDs, C.2.2.2.2)."""
        for level in self.model.levels:
            if level is self.level:
                return
            keyword = UNIQUE_KEYS[level]
            value = self.keys.get(keyword, "")
            single = not (
                is_universal(value)
                or has_wildcard(value)
                or (keyword == "PatientID" and "\\" in value)
            )
            if not single:
                raise IdentifierError(
                    f"one {keyword} needed above {self.level.value} level (PS3.4 C.4.1.2.1)",
                    offending=[int(tag_for_keyword(keyword) or 0)],
                )


def _has_filter(item: Dataset) -> bool:
    for element in item:
        if element.VR == "SQ":
            if any(_has_filter(sub) for sub in element.value or []):
                return True
        elif not is_universal(key_value(element.value)):
            return True
    return False


def _writable_vr(vr: str, tag: int) -> str:
    """The VR to return an attribute with: the data dictionary's (PS3.6),
    whatever VR the request used; of an ambiguous one (``US or SS``) the
    request's if it is one of them, else the first."""
    try:
        known = dictionary_VR(tag)
    except KeyError:
        return vr if vr and " or " not in vr else "UN"
    options = known.split(" or ")
    return vr if vr in options else options[0]


def _tag_name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --------------------------------------------------------------------------
# the response


def response_identifier(find: FindRequest, match: Mapping[str, Any], ae_title: str) -> Dataset:
    """The response identifier of one *match* (PS3.4 C.4.1.1.3.2).

    It holds the Query/Retrieve Level, every key of the request (filled from
    *match*, empty when the index has no value) and, when a value is outside
    the default repertoire, Specific Character Set (see
    :func:`response_character_sets`).  Text is kept as Unicode here; pydicom
    encodes it with the data set's Specific Character Set when pynetdicom
    writes it.
    """
    texts: list[str] = []
    # the elements by tag, then one Dataset made of them (cheaper than
    # Dataset.add per element; the returned keys are distinct tags)
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    level = _element(QUERY_RETRIEVE_LEVEL, "CS", find.level.value)
    elements[level.tag] = level
    for key in find.returned:
        if key.keyword == "RetrieveAETitle":
            value: Any = ae_title
        elif key.keyword == "InstanceAvailability":
            value = ONLINE
        elif key.keyword == "AvailableTransferSyntaxUID":
            value = match.get("TransferSyntaxUID")
        elif key.constant is not None:
            value = key.constant
        elif key.source is None:
            value = None
        else:
            value = match.get(key.source)
        element = _response_element(key, value, texts)
        elements[element.tag] = element
    character_sets = response_character_sets(texts, find.character_sets)
    if character_sets:
        terms: Any = list(character_sets) if len(character_sets) > 1 else character_sets[0]
        charset = _element(SPECIFIC_CHARACTER_SET, "CS", terms)
        elements[charset.tag] = charset
    return Dataset(elements)


def _response_element(key: ReturnKey, value: Any, texts: list[str]) -> DataElement:
    if key.vr == "SQ":
        items = DicomSequence()
        for found in value or []:
            item = Dataset()
            for sub in key.items:
                sub_value = found.get(sub.source) if sub.source is not None else None
                item.add(_response_element(sub, sub_value, texts))
            items.append(item)
        return _element(key.tag, "SQ", items)
    return _element(key.tag, key.vr, _wire_value(key.vr, value, texts))


def _wire_value(vr: str, value: Any, texts: list[str]) -> Any:
    """*value* of a match as pydicom takes it for *vr*; strings noted in
    *texts* for the choice of character set."""
    if value is None or value == "" or value == []:
        return None
    if vr in _BINARY_INT_VRS:
        if isinstance(value, list | tuple):  # an extended query tag's values
            return [int(item) for item in value]
        return int(value)
    if vr in ("FD", "FL"):
        return [float(item) for item in value] if isinstance(value, list | tuple) else float(value)
    if isinstance(value, list | tuple):
        values = [str(item) for item in value]
        texts.extend(values)
        return values
    text = str(value)
    texts.append(text)
    if "\\" in text and vr not in _SINGLE_VALUE_VRS:
        return text.split("\\")
    return text


def _element(tag: int, vr: str, value: Any) -> DataElement:
    """A data element, without pydicom's value checks: their warnings quote
    the value (patient data); the values come from our own index."""
    return DataElement(Tag(tag), vr, value, validation_mode=pydicom_config.IGNORE)


def response_character_sets(
    texts: Iterable[str], requested: Sequence[str]
) -> tuple[str, ...] | None:
    """The Specific Character Set of a response holding *texts*.

    PS3.4 C.4.1.1.3.2: Specific Character Set "shall be included if expanded
    or replacement character sets may be used in any of the Attributes in the
    Response Identifier.  It shall not be included otherwise."

    Returns
    -------
    tuple of str or None
        None if every text is in the default repertoire (ASCII); else the
        *requested* terms if they can encode every text (PS3.5 6.1.2.5: with
        ISO 2022 code extensions, each character in one of the listed
        repertoires); else ``("ISO_IR 192",)``.
    """
    wide = [text for text in texts if not text.isascii()]
    if not wide:
        return None
    if requested and all(encodable(text, requested) for text in wide):
        return tuple(requested)
    return (UTF8,)


def encodable(text: str, terms: Sequence[str]) -> bool:
    """True if each character of *text* can be written in one of the
    character sets named by the Specific Character Set *terms*."""
    codecs = ["ascii" if term in _DEFAULT_TERMS else python_encoding[term] for term in terms]
    return all(any(_encodes(char, codec) for codec in codecs) for char in text)


def _encodes(char: str, codec: str) -> bool:
    encoder = custom_encoders.get(codec)
    try:
        if encoder is not None:
            encoder(char)
        else:
            char.encode(codec)
    except (UnicodeError, LookupError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------
# statuses


def status_dataset(
    status: Status, comment: str | None = None, offending: Sequence[int] = ()
) -> Dataset:
    """A response status for pynetdicom: Status (0000,0900), with Error
    Comment (0000,0902) and Offending Element (0000,0901) when given (PS3.7
    C.4.1.1.4 lists them as the related fields of the C-FIND failures)."""
    dataset = Dataset()
    dataset.Status = int(status)
    if comment:
        dataset.ErrorComment = error_comment(comment)
    if offending:
        dataset.OffendingElement = [Tag(tag) for tag in offending]
    return dataset


def error_comment(reason: str) -> str:
    """*reason* as an Error Comment: LO, so 64 characters of the default
    repertoire without backslash (PS3.5 6.2; the command set has no Specific
    Character Set)."""
    text = "".join(char if char.isascii() and char.isprintable() else "?" for char in reason)
    text = text.replace("\\", "/")
    if len(text) > ERROR_COMMENT_LENGTH:
        text = text[: ERROR_COMMENT_LENGTH - 3] + "..."
    return text


def _shown(text: str, length: int) -> str:
    return repr(text if len(text) <= length else text[:length] + "...")


__all__ = [
    "MODELS",
    "ONLINE",
    "UNIQUE_KEYS",
    "UTF8",
    "FindRequest",
    "IdentifierError",
    "InformationModel",
    "ReturnKey",
    "encodable",
    "error_comment",
    "key_value",
    "parse_find",
    "read_character_sets",
    "read_level",
    "response_character_sets",
    "response_identifier",
    "status_dataset",
]
