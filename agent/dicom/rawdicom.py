"""A DICOM header read straight from bytes already in memory, for the ingest hot path.

pydicom's dcmread builds a Dataset of every element and converts each value it is asked for through
its hook machinery: about 1.5 ms a file, most of the ingest budget (bench/bench_scale.py). This reader
walks the element headers once (struct.unpack_from on the buffer, no copies), keeps where each value
lies, and converts a value only when asked, with pydicom's own rules: the common VRs by a fast path
that gives what pydicom gives, anything else (non-ASCII text, ambiguous or odd values) through
pydicom's convert_raw_data_element itself. The object it returns answers the part of the pydicom
Dataset interface that scanside.agent.dicom.header and scanside.agent.dicom.vendor use (get, in, keys, [tag].value, attributes,
file_meta, sequences as lists of datasets).

It takes only what it can read exactly: a Part 10 file (preamble, DICM, meta group) in implicit or
explicit VR little endian (native or encapsulated pixel data). Anything else (no preamble, big endian,
deflated, an unknown VR, a VR switch, a value running past the buffer) raises Unsupported, and the
caller reads the file with pydicom, which keeps every check it had. Equality with pydicom is tested
on every file of ../shared/realdata and pydicom's test files (tests/agent/test_rawdicom.py).
"""
from __future__ import annotations

import struct
from typing import Any, Iterator, Optional, Union

from pydicom.charset import convert_encodings
from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.dataelem import (
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.hooks import raw_element_vr
from pydicom.tag import BaseTag
from pydicom.uid import UID

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # where pydicom's stop_before_pixels stops
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 12  # nested sequences deeper than this go to pydicom (no real MR header nests half as deep)
IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
BIG_ENDIAN, DEFLATED = "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"

_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # explicit VRs with a 4-byte length
_SHORT = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_NUMERIC_CHARS = frozenset("0123456789.+-eE \\\x00")
# pydicom adjusts these after conversion (a negative first value of a LUT descriptor); its path takes them
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_tag_len = struct.Struct("<HHI").unpack_from
_explicit = struct.Struct("<HH2sH").unpack_from
_VRS = {code: (code.decode("ascii"), code in _LONG) for code in _LONG | _SHORT}  # VR bytes -> (VR, 4-byte length)


class Unsupported(Exception):
    """Not a header this reader takes exactly: read the file with pydicom instead."""


class Incomplete(Unsupported):
    """The header runs past the bytes given: more of the file may let this reader take it."""


class RawElement:
    """One element as pydicom shows it: tag, VR and value (converted on first access, then kept)."""

    __slots__ = ("_ds", "tag")

    def __init__(self, ds: "RawDataset", tag: int):
        self.tag = BaseTag(tag)
        self._ds = ds

    @property
    def VR(self) -> str:
        return self._ds.vr_of(self.tag)

    @property
    def value(self) -> Any:
        return self._ds.value_of(self.tag)


def _numbers(fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)

    def convert(raw: bytes) -> Any:
        n, rest = divmod(len(raw), size)
        if rest:
            return None  # pydicom's path (it makes the element UN)
        vals = struct.unpack(f"<{n}{fmt}", raw)
        return vals[0] if n == 1 else list(vals)
    return convert


def _split(text: str) -> Any:
    items = text.rstrip(" \x00").split("\\")
    return items[0] if len(items) == 1 else items


def _decimal(raw: bytes) -> Any:
    text = raw.decode("latin-1")
    if not _NUMERIC_CHARS.issuperset(text):  # NaN, inf, garbage: pydicom decides what it becomes
        return None
    vals = [float(x) for x in text.rstrip(" \x00").split("\\")]  # ValueError: pydicom's path (it tries other VRs)
    return vals[0] if len(vals) == 1 else vals


def _integer(raw: bytes) -> Any:
    text = raw.decode("latin-1")
    if not _NUMERIC_CHARS.issuperset(text):
        return None
    vals = [int(x) for x in text.rstrip(" \x00").split("\\")]
    return vals[0] if len(vals) == 1 else vals


def _uid(raw: bytes) -> Any:
    items = raw.decode("latin-1").rstrip("\x00 ").split("\\")
    return UID(items[0]) if len(items) == 1 else [UID(x) for x in items]


def _charset_free(raw: bytes) -> Optional[str]:
    """The text where no character set can change it (ASCII, no ISO 2022 escape); None otherwise."""
    return raw.decode("ascii") if raw.isascii() and b"\x1b" not in raw else None


def _text(raw: bytes) -> Any:
    text = _charset_free(raw)
    if text is None:
        return None
    items = [x.rstrip("\x00 ") for x in text.split("\\")]
    return items[0] if len(items) == 1 else items


def _single_text(raw: bytes) -> Any:
    text = _charset_free(raw)
    return None if text is None else text.rstrip("\x00 ")


# pydicom's value for the common VRs (None: take pydicom's own path). Text VRs without a character
# set (CS, DS, IS, UI, dates) are decoded as latin-1, as pydicom decodes them whatever the set.
_FAST: dict[str, Any] = {
    **{vr: _numbers(fmt) for vr, fmt in {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d",
                                          "SV": "q", "UV": "Q"}.items()},
    **{vr: bytes for vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN")},
    **{vr: (lambda raw: _split(raw.decode("latin-1"))) for vr in ("AS", "CS", "DA", "DT", "TM")},
    "DS": _decimal, "IS": _integer, "UI": _uid,
    **{vr: _text for vr in ("SH", "LO", "UC")},
    **{vr: _single_text for vr in ("ST", "LT", "UT")},
}


_KEYWORD_TAGS: dict[str, Optional[int]] = {}
_UNSET = object()
_SHORT_VALUES: dict[tuple[str, bytes], Any] = {}  # (VR, bytes) -> converted value, immutable values only
_PRIVATE_VRS: dict[tuple[int, Optional[str], Any], str] = {}  # (tag, VR read, creator) -> pydicom's VR


def _tag_of(key: Union[str, int]) -> Optional[int]:
    if isinstance(key, int):
        return int(key)
    tag = _KEYWORD_TAGS.get(key, -1)
    if tag == -1:
        tag = _KEYWORD_TAGS[key] = tag_for_keyword(key)
    return tag


class RawDataset:
    """The elements of one data set (the file's, or one sequence item), values converted lazily."""

    def __init__(self, buffer: bytes, implicit: bool, parent: Optional["RawDataset"] = None):
        self.buffer = buffer
        self.implicit = implicit
        # tag -> (VR or None in implicit VR, value offset, length, items of a walked sequence): an element
        # object is made only for what is asked for
        self.elements: dict[int, tuple[Optional[str], int, int, Optional[list[RawDataset]]]] = {}
        self._objects: dict[int, RawElement] = {}
        self._vrs: dict[int, str] = {}
        self._values: dict[int, Any] = {}
        self._creators: Optional[dict[int, list[tuple[int, int]]]] = None  # group -> (slot, tag), on first use
        self._creator_values: dict[int, list[tuple[int, Any]]] = {}
        self.file_meta: Optional[RawDataset] = None
        self._parent = parent
        self._encodings: Any = False  # not looked up yet

    @property
    def encodings(self) -> Optional[list[str]]:
        """The character sets text values are decoded with: this data set's (0008,0005), else its parent's."""
        if self._encodings is False:
            value = self.value_of(0x00080005) if 0x00080005 in self.elements else None
            if value:
                self._encodings = convert_encodings(value)
            else:
                self._encodings = self._parent.encodings if self._parent is not None else None
        return self._encodings

    def element(self, tag: int) -> Optional[RawElement]:
        if tag not in self.elements:
            return None
        obj = self._objects.get(tag)
        if obj is None:
            obj = self._objects[tag] = RawElement(self, tag)
        return obj

    def private_creators(self, group: int) -> list[tuple[int, Any]]:
        """(slot, value) of the private creator elements (gggg,0010-00FF) of an odd group, by slot."""
        if self._creators is None:
            index: dict[int, list[tuple[int, int]]] = {}
            for tag in sorted(t for t in self.elements if (t >> 16) & 1 and 0x10 <= (t & 0xFFFF) <= 0xFF):
                index.setdefault(tag >> 16, []).append((tag & 0xFF, tag))
            self._creators = index
        found = self._creator_values.get(group)
        if found is None:
            found = self._creator_values[group] = [(slot, self.value_of(tag)) for slot, tag in self._creators.get(group, ())]
        return found

    def vr_of(self, tag: int) -> str:
        vr = self._vrs.get(tag)
        if vr is None:
            vr = self.elements[tag][0]
            if vr is None and tag in DicomDictionary:  # implicit VR: pydicom's dictionary_VR, without its calls
                vr = DicomDictionary[tag][0]
            if (vr is None or vr == "UN") and (tag >> 16) & 1 and 0x10 <= (tag & 0xFFFF) <= 0xFF:
                vr = "LO"  # a private creator element, as pydicom reads one
            if vr is None or vr == "UN":  # private, unknown or UN: pydicom's own rules
                key = None
                if (tag >> 16) & 1 and tag & 0xFF00:  # a private element's VR follows from its creator alone
                    creator = (tag & 0xFFFF0000) | ((tag >> 8) & 0xFF)
                    name = self.value_of(creator) if creator in self.elements else None
                    key = (tag, vr, name) if name is None or isinstance(name, str) else None
                    found = _PRIVATE_VRS.get(key) if key is not None else None
                    if found is not None:
                        self._vrs[tag] = found
                        return found
                data: dict[str, Any] = {}
                raw_element_vr(self._raw(tag, vr), data, encoding=self._encodings_for(tag), ds=self)  # type: ignore[arg-type]
                vr = str(data["VR"])
                if key is not None and len(_PRIVATE_VRS) < 100_000:
                    _PRIVATE_VRS[key] = vr
            self._vrs[tag] = vr
        return vr

    def value_of(self, tag: int) -> Any:
        try:
            return self._values[tag]
        except KeyError:
            value = self._values[tag] = self._convert(tag)
            return value

    def _raw(self, tag: int, vr: Optional[str]) -> RawDataElement:
        _, start, length, _ = self.elements[tag]
        return RawDataElement(BaseTag(tag), vr, length, self.buffer[start:start + length], start, self.implicit, True)

    def _encodings_for(self, tag: int) -> Optional[list[str]]:
        return None if tag == 0x00080005 else self.encodings  # the charset itself is read as ASCII

    def _convert(self, tag: int) -> Any:
        vr, start, length, items = self.elements[tag]
        if vr is None or vr == "UN":
            vr = self.vr_of(tag)
        if vr == "SQ" and items is not None:
            return items
        if length == 0:
            return empty_value_for_VR(vr)
        fast = _FAST.get(vr) if tag not in _LUT_DESCRIPTORS else None
        if fast is not None:
            raw = self.buffer[start:start + length]
            if length <= 64:  # most short values repeat in every file of a series: converted once
                value = _SHORT_VALUES.get((vr, raw))
                if value is not None:
                    return value
            try:
                value = fast(raw)
            except (ValueError, UnicodeDecodeError):
                value = None
            if value is not None:
                if length <= 64 and isinstance(value, (str, float, int)):  # immutable only (never a list)
                    if len(_SHORT_VALUES) >= 50_000:
                        _SHORT_VALUES.clear()
                    _SHORT_VALUES[(vr, raw)] = value
                return value
        # anything the fast path does not take exactly (ambiguous VRs such as US or SS, a sequence not
        # walked, non-ASCII text, odd numbers): pydicom's own conversion
        return convert_raw_data_element(self._raw(tag, vr), encoding=self._encodings_for(tag), ds=self).value  # type: ignore[arg-type]

    # -- the part of pydicom's Dataset interface the header code uses
    def get(self, key: Union[str, int], default: Any = None) -> Any:
        """As pydicom: a keyword gives the value, a tag the element."""
        tag = _KEYWORD_TAGS.get(key)  # type: ignore[arg-type]
        if tag is None:
            if isinstance(key, int):
                found = self.element(key)
                return default if found is None else found
            tag = _tag_of(key)
            if tag is None:
                return default
        value = self._values.get(tag, _UNSET)
        if value is _UNSET:
            if tag not in self.elements:
                return default
            value = self._values[tag] = self._convert(tag)
        return value

    def __contains__(self, key: Union[str, int]) -> bool:
        tag = _tag_of(key)
        return tag is not None and tag in self.elements

    def __getitem__(self, tag: int) -> RawElement:
        found = self.element(tag)
        if found is None:
            raise KeyError(tag)
        return found

    def __getattr__(self, name: str) -> Any:
        if name[:1].isupper():
            tag = _tag_of(name)
            if tag is not None and tag in self.elements:
                return self.value_of(tag)
        raise AttributeError(name)

    def keys(self) -> Any:
        return self.elements.keys()

    def __iter__(self) -> Iterator[RawElement]:
        return (self[tag] for tag in self.elements)

    def __len__(self) -> int:
        return len(self.elements)

    def __bool__(self) -> bool:
        return bool(self.elements)


_ITEM_BYTES = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian


def _walk(ds: RawDataset, pos: int, end: int, depth: int, top: bool) -> int:
    """Record ds's elements from pos; returns the offset where the walk stopped (end, an item
    delimiter consumed, or the pixel data tag at the top level, not consumed)."""
    buf = ds.buffer
    implicit = ds.implicit
    elements = ds.elements
    while pos < end:
        if pos + 8 > end:
            raise Incomplete("element header cut off")
        if implicit:
            group, elem, length = _tag_len(buf, pos)
            vr: Optional[str] = None
            start = pos + 8
        else:
            group, elem, code, length = _explicit(buf, pos)
            known = _VRS.get(code)
            if known is not None:
                vr, long = known
                if long:
                    if pos + 12 > end:
                        raise Incomplete("element header cut off")
                    length = _u32(buf, pos + 8)[0]
                    start = pos + 12
                else:
                    start = pos + 8
            elif group == 0xFFFE:  # an item delimiter has no VR
                vr, start = None, pos + 8
            else:  # pydicom guesses here (an implicit switch, a 2-byte length): let it
                raise Unsupported(f"VR {code!r}")
        tag = group << 16 | elem
        if group >= 0x7FE0:
            if tag == ITEM_END:
                return pos + 8
            if top and tag in PIXEL_TAGS:
                return pos
            if group == 0xFFFE:  # a stray item or sequence tag: pydicom's call
                raise Unsupported("misplaced item tag")
        if length == UNDEFINED:
            if depth >= MAX_DEPTH:
                raise Unsupported("sequences nested too deep")
            if vr is None:
                try:
                    vr = dictionary_VR(tag)
                except KeyError:  # pydicom looks ahead: items follow, so a sequence
                    vr = "SQ" if buf[start:start + 4] == _ITEM_BYTES else None
            if vr != "SQ":
                raise Unsupported("undefined length outside a sequence")
            items, pos = _sequence(ds, start, end, depth + 1, defined=False)
            entry: tuple[Optional[str], int, int, Optional[list[RawDataset]]] = ("SQ", start, 0, items)
        else:
            pos = start + length
            if pos > end:
                raise Incomplete("value runs past the bytes read")
            # a sequence is walked now, so that what this reader cannot take shows before anything is used;
            # in implicit VR, a value that starts with an item tag may be one (its VR is looked up later)
            if vr == "SQ" or (vr is None and length >= 8 and buf[start:start + 4] == _ITEM_BYTES):
                if depth >= MAX_DEPTH:
                    raise Unsupported("sequences nested too deep")
                entry = (vr, start, length, _sequence(ds, start, pos, depth + 1, defined=True)[0])
            else:
                entry = (vr, start, length, None)
        if tag in elements:
            raise Unsupported("repeated tag")  # pydicom keeps the last; where a writer did this, let it decide
        elements[tag] = entry
    return pos


def _sequence(ds: RawDataset, pos: int, end: int, depth: int, defined: bool) -> tuple[list[RawDataset], int]:
    """The items of a sequence value from pos: up to end (``defined`` length) or up to its sequence
    delimiter (undefined length); returns them and the offset after the value."""
    items: list[RawDataset] = []
    buf = ds.buffer
    while not defined or pos < end:
        if pos + 8 > end:
            raise Incomplete("sequence cut off")
        group, elem, length = _tag_len(buf, pos)
        tag = group << 16 | elem
        if tag == SEQ_END and not defined:
            return items, pos + 8
        if tag != ITEM:
            raise Unsupported("no item in a sequence")
        item = RawDataset(ds.buffer, ds.implicit, ds)
        if length == UNDEFINED:
            pos = _walk(item, pos + 8, end, depth, False)
        else:
            if pos + 8 + length > end:
                raise Incomplete("item runs past the bytes read")
            if _walk(item, pos + 8, pos + 8 + length, depth, False) != pos + 8 + length:
                raise Unsupported("item delimiter inside a defined-length item")
            pos += 8 + length
        items.append(item)
    return items, pos


def read_part10(buffer: bytes, whole_file: bool) -> tuple[RawDataset, int]:
    """The header of a Part 10 file from its first bytes (``whole_file``: they are all of it); returns
    the data set and the offset of the pixel data element (len(buffer) when the file has none).

    Raises Unsupported where pydicom must read it: no preamble, a transfer syntax other than implicit
    or explicit VR little endian (encapsulated included), a header longer than the buffer, anything odd."""
    if len(buffer) < 132 or buffer[128:132] != b"DICM":
        raise Unsupported("no preamble")
    meta = RawDataset(buffer, implicit=False)
    pos = 132
    while pos + 8 <= len(buffer) and _u16(buffer, pos)[0] == 0x0002:
        pos = _walk_one(meta, pos, len(buffer))
    ts_elem = meta.element(0x00020010)
    ts = str(ts_elem.value) if ts_elem is not None else ""
    if not ts:
        raise Unsupported("no transfer syntax")
    uid = UID(ts)
    if ts in (BIG_ENDIAN, DEFLATED) or not uid.is_transfer_syntax or not uid.is_little_endian:
        raise Unsupported(f"transfer syntax {ts}")
    implicit = ts == IMPLICIT_LE
    if pos + 6 <= len(buffer):  # pydicom checks the data set against the syntax the meta names, and switches
        looks_explicit = bytes(buffer[pos + 4:pos + 6]) in _LONG | _SHORT
        if looks_explicit == implicit:
            raise Unsupported("data set encoding differs from the transfer syntax")
    ds = RawDataset(buffer, implicit)
    ds.file_meta = meta
    stop = _walk(ds, pos, len(buffer), 0, True)
    if stop >= len(buffer) and not whole_file:
        raise Incomplete("header longer than the bytes read")
    return ds, stop


def _walk_one(meta: RawDataset, pos: int, end: int) -> int:
    """One file meta element (explicit VR little endian, always)."""
    group, elem, _ = _tag_len(meta.buffer, pos)
    code = bytes(meta.buffer[pos + 4:pos + 6])
    if code in _LONG:
        length, start = _u32(meta.buffer, pos + 8)[0], pos + 12
    elif code in _SHORT:
        length, start = _u16(meta.buffer, pos + 6)[0], pos + 8
    else:
        raise Unsupported(f"file meta VR {code!r}")
    if length == UNDEFINED or start + length > end:
        raise Incomplete("file meta element runs past the bytes read")
    tag = group << 16 | elem
    if tag in meta.elements:
        raise Unsupported("repeated file meta tag")
    meta.elements[tag] = (code.decode("ascii"), start, length, None)
    return start + length
