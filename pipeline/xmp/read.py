"""Face regions out of an XMP packet (a sidecar, or XMP embedded in a photo).

RDF lets one property be written several ways (an attribute, an element with text, a
struct as ``rdf:parseType="Resource"``, a nested ``rdf:Description``, or attributes on the
property element); ``_value`` reads them all into plain dicts, lists and strings, so the
MWG and Microsoft Photo readers below see one shape whatever tool wrote the file.
Embedded XMP comes from Pillow (``im.info["xmp"]``, what its JPEG, PNG, WebP and
pillow-heif's HEIC readers give) or, failing that, from the ``<x:xmpmeta>`` packet found
in the file's bytes.
"""
from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from pipeline.xmp.namespaces import MP, MPREG, MPRI, MWG_RS, RDF, ST_AREA, ST_DIM, XML, q
from pipeline.xmp.regions import SWAPS, Box, from_centre
from pipeline.xmp.write import XmpError, parse, rdf_root

CONTAINERS = {q(RDF, "Bag"), q(RDF, "Seq"), q(RDF, "Alt")}
PACKET_RE = re.compile(rb"<x:xmpmeta[\s>].*?</x:xmpmeta>", re.S)
PACKET_RE_RDF = re.compile(rb"<rdf:RDF[\s>].*?</rdf:RDF>", re.S)


@dataclass(frozen=True)
class Region:
    """A face region as the file gives it: a normalised top-left box in the frame of
    ``applied`` (MWG ``AppliedToDimensions`` w, h, when given), its name when named."""
    box: Box
    name: str | None
    form: str                                   # "mwg" or "mp"
    applied: tuple[float, float] | None = None


def _is_property(attr: str) -> bool:
    """An attribute that is a property (not rdf:about, rdf:parseType, xml:lang…)."""
    return not attr.startswith((f"{{{RDF}}}", f"{{{XML}}}"))


def _struct(el: ET.Element) -> dict:
    """A struct's fields: its property attributes and its property elements."""
    out: dict = {k: v for k, v in el.attrib.items() if _is_property(k)}
    for child in el:
        if child.tag == q(RDF, "Description"):
            out.update(_struct(child))
        else:
            out[child.tag] = _value(child)
    return out


def _value(el: ET.Element):  # noqa: ANN202 - str, list or dict
    """A property element's value: a string, a list (Bag/Seq/Alt) or a dict (struct)."""
    kids = list(el)
    if el.get(q(RDF, "parseType")) == "Resource":
        return _struct(el)
    if not kids:
        if any(_is_property(k) for k in el.attrib):
            return _struct(el)
        return el.get(q(RDF, "resource"), el.text or "")
    if kids[0].tag in CONTAINERS:
        return [_value(li) for li in kids[0] if li.tag == q(RDF, "li")]
    return _struct(el)


def properties(root: ET.Element) -> dict:
    """Every top-level property of a packet (all its ``rdf:Description``s merged)."""
    out: dict = {}
    for desc in rdf_root(root).findall(q(RDF, "Description")):
        out.update(_struct(desc))
    return out


def _float(v: object) -> float:
    if isinstance(v, dict | list):
        raise XmpError(f"a number was expected, got {v!r}")
    return float(str(v).strip())


def _text(v: object) -> str | None:
    if isinstance(v, list):      # an Alt or Bag of names: its first entry
        v = v[0] if v else None
    if isinstance(v, dict) or v is None:
        return None
    s = " ".join(str(v).split())
    return s or None


def mwg_regions(props: dict) -> tuple[list[Region], int]:
    """MWG face regions, and how many regions were skipped (other types, not boxes)."""
    info = props.get(q(MWG_RS, "Regions"))
    if info is None:
        return [], 0
    if not isinstance(info, dict):
        raise XmpError("mwg-rs:Regions is not a struct")
    applied = None
    dims = info.get(q(MWG_RS, "AppliedToDimensions"))
    if isinstance(dims, dict) and q(ST_DIM, "w") in dims and q(ST_DIM, "h") in dims:
        applied = (_float(dims[q(ST_DIM, "w")]), _float(dims[q(ST_DIM, "h")]))
    items = info.get(q(MWG_RS, "RegionList"), [])
    if not isinstance(items, list):
        raise XmpError("mwg-rs:RegionList is not a Bag")
    out, skipped = [], 0
    for item in items:
        if not isinstance(item, dict):
            raise XmpError("an mwg-rs region is not a struct")
        kind = _text(item.get(q(MWG_RS, "Type"))) or "Face"
        area = item.get(q(MWG_RS, "Area"))
        if kind != "Face" or not isinstance(area, dict) or q(ST_AREA, "w") not in area or q(ST_AREA, "h") not in area:
            skipped += 1     # a pet, a focus point, a circle or a point: not a face box
            continue
        box = from_centre(*(_float(area[q(ST_AREA, k)]) for k in "xywh"))
        out.append(Region(box, _text(item.get(q(MWG_RS, "Name"))), "mwg", applied))
    return out, skipped


def mp_regions(props: dict) -> tuple[list[Region], int]:
    """Microsoft Photo (``MP:RegionInfo``) regions: ``MPReg:Rectangle`` "x, y, w, h"
    normalised top-left, ``MPReg:PersonDisplayName``."""
    info = props.get(q(MP, "RegionInfo"))
    if info is None:
        return [], 0
    if not isinstance(info, dict):
        raise XmpError("MP:RegionInfo is not a struct")
    items = info.get(q(MPRI, "Regions"), [])
    if not isinstance(items, list):
        raise XmpError("MPRI:Regions is not a Bag")
    out, skipped = [], 0
    for item in items:
        if not isinstance(item, dict):
            raise XmpError("an MPRI region is not a struct")
        rect = _text(item.get(q(MPREG, "Rectangle")))
        if not rect:
            skipped += 1
            continue
        parts = [_float(p) for p in rect.split(",")]
        if len(parts) != 4:
            raise XmpError(f"MPReg:Rectangle {rect!r} is not x, y, w, h")
        out.append(Region(Box(*parts), _text(item.get(q(MPREG, "PersonDisplayName"))), "mp"))
    return out, skipped


def packet_regions(data: bytes) -> tuple[list[Region], int]:
    """The face regions of one XMP packet: MWG when it has them, else Microsoft Photo's
    (tools that write both write the same faces twice); and the count skipped."""
    props = properties(parse(data))
    regions, skipped = mwg_regions(props)
    if regions:
        return regions, skipped
    mp, mp_skipped = mp_regions(props)
    return mp, skipped + mp_skipped


def _pillow():  # noqa: ANN202 - PIL.Image
    """Pillow with pillow-heif's HEIC opener registered (AVIF is Pillow's own)."""
    from PIL import Image
    from pillow_heif import register_heif_opener

    register_heif_opener()
    return Image


def find_packet(data: bytes) -> bytes | None:
    """The XMP packet inside a file's bytes: Pillow's reading first, else a scan."""
    try:
        with _pillow().open(io.BytesIO(data)) as im:
            xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
            if xmp:
                return xmp.encode("utf-8") if isinstance(xmp, str) else bytes(xmp)
    except Exception:  # noqa: BLE001 - a photo Pillow cannot open may still carry a packet
        pass
    m = PACKET_RE.search(data) or PACKET_RE_RDF.search(data)
    return m.group(0) if m else None


def photo_header(data: bytes) -> tuple[int | None, int | None, int | None]:
    """(EXIF orientation 1–8 or None, width, height after orientation) from a photo's
    header; (None, None, None) when Pillow cannot open it."""
    try:
        with _pillow().open(io.BytesIO(data)) as im:
            value = im.getexif().get(0x0112)
            w, h = im.size
        rot = int(value) if value else None
        return (rot, h, w) if rot in SWAPS else (rot, w, h)
    except Exception:  # noqa: BLE001 - a photo without a readable header has no orientation
        return None, None, None
