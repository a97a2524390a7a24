"""A DICOM header read straight from bytes already in memory, for the ingest hot path.

pydicom's dcmread builds a Dataset of every element and converts each value it is asked for through
its hook machinery: about 1.5 ms a file, most of the ingest budget (bench/bench_scale.py). This reader
walks the element headers once (struct.unpack_from on the buffer, no copies), keeps where each value
lies, and converts a value only when asked, with pydicom's own rules: the common VRs by a fast path
that gives what pydicom gives, anything else (non-ASCII text, ambiguous or odd values) through
pydicom's convert_raw_data_element itself. The object it returns answers the part of the pydicom
Dataset interface that agent.header and agent.vendor use (get, in, keys, [tag].value, attributes,
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
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
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
_TEXT_SPLIT = frozenset({"AS", "CS", "DA", "DT", "TM"})  # pydicom's convert_string family
_TEXT_CHARSET = frozenset({"SH", "LO", "UC"})  # split on backslash, each value stripped of trailing "\0 "
_TEXT_SINGLE = frozenset({"ST", "LT", "UT"})  # not split
_NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_BYTES = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_NUMERIC_CHARS = frozenset("0123456789.+-eE \\\x00")
# pydicom adjusts these after conversion (a negative first value of a LUT descriptor); its path takes them
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_tag_len = struct.Struct("<HHI").unpack_from


class Unsupported(Exception):
    """Not a header this reader takes exactly: read the file with pydicom instead."""


class Incomplete(Unsupported):
    """The header runs past the bytes given: more of the file may let this reader take it."""


class RawElement:
    """One element: tag, VR and its value, converted on first access."""

    __slots__ = ("tag", "_ds", "_vr", "_start", "_length", "_items", "_value", "_done")

    def __init__(self, ds: "RawDataset", tag: int, vr: Optional[str], start: int, length: int,
                 items: Optional[list["RawDataset"]] = None):
        self.tag = BaseTag(tag)
        self._ds = ds
        self._vr = vr
        self._start = start
        self._length = length
        self._items = items  # an undefined-length sequence, already walked
        self._done = False
        self._value: Any = None

    @property
    def VR(self) -> str:
        if self._vr is None or self._vr == "UN":
            data: dict[str, Any] = {}
            raw_element_vr(self._raw(self._vr), data, encoding=self._encodings(), ds=self._ds)  # type: ignore[arg-type]
            self._vr = str(data["VR"])
        return self._vr

    @property
    def value(self) -> Any:
        if not self._done:
            self._value = self._convert()
            self._done = True
        return self._value

    def _raw(self, vr: Optional[str]) -> RawDataElement:
        buf = self._ds.buffer
        return RawDataElement(self.tag, vr, self._length, bytes(buf[self._start:self._start + self._length]), self._start,
                              self._ds.implicit, True)

    def _encodings(self) -> Optional[list[str]]:
        return None if self.tag == 0x00080005 else self._ds.encodings  # the charset itself is read as ASCII

    def _convert(self) -> Any:
        vr = self.VR
        if vr == "SQ" and self._items is not None:
            return self._items
        if self._length == 0:
            return empty_value_for_VR(vr)
        # ambiguous VRs (US or SS...) and a sequence not walked (no item tag ahead): pydicom's path
        if " or " in vr or vr == "SQ" or self.tag in _LUT_DESCRIPTORS:
            return convert_raw_data_element(self._raw(vr), encoding=self._encodings(), ds=self._ds).value  # type: ignore[arg-type]
        raw = bytes(self._ds.buffer[self._start:self._start + self._length])
        try:
            fast = _fast_value(vr, raw)
        except (ValueError, UnicodeDecodeError, struct.error):
            fast = None
        if fast is not None:
            return fast
        # anything the fast path does not take exactly: pydicom's own conversion
        return convert_raw_data_element(self._raw(vr), encoding=self._encodings(), ds=self._ds).value  # type: ignore[arg-type]


def _fast_value(vr: str, raw: bytes) -> Any:
    """pydicom's value for the common VRs, or None (take pydicom's path)."""
    if vr in _NUMBERS:
        fmt = _NUMBERS[vr]
        size = struct.calcsize(fmt)
        if len(raw) % size:
            return None
        vals = struct.unpack(f"<{len(raw) // size}{fmt}", raw)
        return vals[0] if len(vals) == 1 else list(vals)
    if vr in _BYTES:
        return raw
    if not raw.isascii() or b"\x1b" in raw:  # a character set in play: pydicom decodes it
        return None
    text = raw.decode("ascii")
    if vr == "DS" or vr == "IS":
        if not _NUMERIC_CHARS.issuperset(text):  # NaN, inf, garbage: pydicom decides what it becomes
            return None
        items = text.rstrip(" \x00").split("\\")
        conv = float if vr == "DS" else int
        vals = [conv(x) for x in items]  # ValueError: pydicom's path (it tries other VRs)
        return vals[0] if len(vals) == 1 else vals
    if vr == "UI":
        items = text.rstrip("\x00 ").rstrip(" \x00").split("\\")
        return UID(items[0]) if len(items) == 1 else [UID(x) for x in items]
    if vr in _TEXT_SPLIT:
        items = text.rstrip(" \x00").split("\\")
        return items[0] if len(items) == 1 else items
    if vr in _TEXT_CHARSET:
        items = [x.rstrip("\x00 ") for x in text.split("\\")]
        return items[0] if len(items) == 1 else items
    if vr in _TEXT_SINGLE:
        return text.rstrip("\x00 ")
    return None


_KEYWORD_TAGS: dict[str, Optional[int]] = {}


def _tag_of(key: Union[str, int]) -> Optional[int]:
    if isinstance(key, int):
        return int(key)
    tag = _KEYWORD_TAGS.get(key, -1)
    if tag == -1:
        tag = _KEYWORD_TAGS[key] = tag_for_keyword(key)
    return tag  # type: ignore[return-value]


class RawDataset:
    """The elements of one data set (the file's, or one sequence item), values converted lazily."""

    def __init__(self, buffer: Union[bytes, memoryview], implicit: bool, parent: Optional["RawDataset"] = None):
        self.buffer = buffer
        self.implicit = implicit
        self.elements: dict[int, RawElement] = {}
        self.file_meta: Optional[RawDataset] = None
        self._parent = parent
        self._encodings: Any = False  # not looked up yet

    @property
    def encodings(self) -> Optional[list[str]]:
        """The character sets text values are decoded with: this data set's (0008,0005), else its parent's."""
        if self._encodings is False:
            cs = self.elements.get(0x00080005)
            value = cs.value if cs is not None else None
            if value:
                self._encodings = convert_encodings(value)
            else:
                self._encodings = self._parent.encodings if self._parent is not None else None
        return self._encodings  # type: ignore[no-any-return]

    # -- the part of pydicom's Dataset interface the header code uses
    def get(self, key: Union[str, int], default: Any = None) -> Any:
        """As pydicom: a keyword gives the value, a tag the element."""
        if isinstance(key, int):
            return self.elements.get(key, default)
        tag = _tag_of(key)
        elem = self.elements.get(tag) if tag is not None else None  # type: ignore[arg-type]
        return default if elem is None else elem.value

    def __contains__(self, key: Union[str, int]) -> bool:
        tag = _tag_of(key)
        return tag is not None and tag in self.elements

    def __getitem__(self, tag: int) -> RawElement:
        return self.elements[tag]

    def __getattr__(self, name: str) -> Any:
        if name[:1].isupper():
            tag = _tag_of(name)
            if tag is not None and tag in self.elements:
                return self.elements[tag].value
        raise AttributeError(name)

    def keys(self) -> Any:
        return self.elements.keys()

    def __iter__(self) -> Iterator[RawElement]:
        return iter(self.elements.values())

    def __len__(self) -> int:
        return len(self.elements)

    def __bool__(self) -> bool:
        return bool(self.elements)


def _walk(ds: RawDataset, pos: int, end: int, depth: int, top: bool) -> int:
    """Record ds's elements from pos; returns the offset where the walk stopped (end, an item
    delimiter consumed, or the pixel data tag at the top level, not consumed)."""
    buf = ds.buffer
    implicit = ds.implicit
    elements = ds.elements
    while pos < end:
        if pos + 8 > end:
            raise Incomplete("element header cut off")
        group, elem, length = _tag_len(buf, pos)
        tag = group << 16 | elem
        if tag == ITEM_END:
            return pos + 8
        if top and tag in PIXEL_TAGS:
            return pos
        if implicit:
            vr: Optional[str] = None
            start = pos + 8
        else:
            code = bytes(buf[pos + 4:pos + 6])
            if code in _LONG:
                if pos + 12 > end:
                    raise Incomplete("element header cut off")
                length = _u32(buf, pos + 8)[0]
                start = pos + 12
            elif code in _SHORT:
                length = _u16(buf, pos + 6)[0]
                start = pos + 8
            else:  # pydicom guesses here (an implicit switch, a 2-byte length): let it
                raise Unsupported(f"VR {code!r}")
            vr = code.decode("ascii")
        if tag in elements or (tag >> 16) == 0xFFFE:  # a repeated tag or a stray item tag: pydicom's call
            raise Unsupported("repeated or misplaced tag")
        if length == UNDEFINED:
            if depth >= MAX_DEPTH:
                raise Unsupported("sequences nested too deep")
            if vr is None:
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    # pydicom looks ahead: items follow, so a sequence
                    vr = "SQ" if start + 4 <= end and _u16(buf, start) + _u16(buf, start + 2) == (0xFFFE, 0xE000) else None
            if vr != "SQ":
                raise Unsupported("undefined length outside a sequence")
            items, pos = _sequence(ds, start, end, depth + 1, defined=False)
            elements[tag] = RawElement(ds, tag, "SQ", start, 0, items)
            continue
        if start + length > end:
            raise Incomplete("value runs past the bytes read")
        seq: Optional[list[RawDataset]] = None
        # a sequence is walked now, so that what this reader cannot take shows before anything is used;
        # in implicit VR, a value that starts with an item tag may be one (its VR is looked up later)
        if vr == "SQ" or (vr is None and length >= 8 and _u16(buf, start) + _u16(buf, start + 2) == (0xFFFE, 0xE000)):
            if depth >= MAX_DEPTH:
                raise Unsupported("sequences nested too deep")
            seq = _sequence(ds, start, start + length, depth + 1, defined=True)[0]
        elements[tag] = RawElement(ds, tag, vr, start, length, seq)
        pos = start + length
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
    view = memoryview(buffer)
    meta = RawDataset(view, implicit=False)
    pos = 132
    while pos + 8 <= len(buffer) and _u16(buffer, pos)[0] == 0x0002:
        pos = _walk_one(meta, pos, len(buffer))
    ts_elem = meta.elements.get(0x00020010)
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
    ds = RawDataset(view, implicit)
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
    meta.elements[tag] = RawElement(meta, tag, code.decode("ascii"), start, length)
    return start + length
