"""XMP packets with faceray's face regions: a new sidecar, or merged into an existing one.

Written with the standard library's ElementTree (it escapes ``&``, ``<``, quotes and writes
any script as UTF-8); an existing sidecar is parsed through ``defusedxml`` (no entity
expansion from a file faceray did not write).  A merge keeps every other property and
namespace of the sidecar and replaces only ``mwg-rs:Regions`` and
``Iptc4xmpExt:PersonInImage``.
"""
from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterable

from pipeline.xmp.namespaces import IPTC_EXT, MWG_RS, PREFIXES, RDF, ST_AREA, ST_DIM, X, q
from pipeline.xmp.regions import mwg_area

TOOLKIT = "faceray"
PACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
PACKET_END = '\n<?xpacket end="w"?>\n'
REPLACED = (q(MWG_RS, "Regions"), q(IPTC_EXT, "PersonInImage"))

for _prefix, _uri in PREFIXES.items():
    ET.register_namespace(_prefix, _uri)


class XmpError(ValueError):
    """An XMP packet that cannot be parsed or holds no ``rdf:RDF``."""


@dataclass(frozen=True)
class FaceRegion:
    """One face to write: its box in pixels of the oriented photo, its name when named."""
    bbox: tuple[float, float, float, float]
    name: str | None = None


def _num(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".") or "0"


def description(width: int, height: int, faces: Iterable[FaceRegion]) -> ET.Element:
    """An ``rdf:Description`` holding the regions and ``PersonInImage``."""
    faces = list(faces)
    desc = ET.Element(q(RDF, "Description"), {q(RDF, "about"): ""})
    regions = ET.SubElement(desc, q(MWG_RS, "Regions"), {q(RDF, "parseType"): "Resource"})
    ET.SubElement(regions, q(MWG_RS, "AppliedToDimensions"),
                  {q(ST_DIM, "w"): str(int(width)), q(ST_DIM, "h"): str(int(height)), q(ST_DIM, "unit"): "pixel"})
    bag = ET.SubElement(ET.SubElement(regions, q(MWG_RS, "RegionList")), q(RDF, "Bag"))
    for face in faces:
        attrs = {q(MWG_RS, "Type"): "Face"}
        if face.name:
            attrs[q(MWG_RS, "Name")] = face.name
        region = ET.SubElement(ET.SubElement(bag, q(RDF, "li")), q(RDF, "Description"), attrs)
        cx, cy, w, h = mwg_area(face.bbox, width, height)
        ET.SubElement(region, q(MWG_RS, "Area"), {q(ST_AREA, "x"): _num(cx), q(ST_AREA, "y"): _num(cy),
                                                  q(ST_AREA, "w"): _num(w), q(ST_AREA, "h"): _num(h),
                                                  q(ST_AREA, "unit"): "normalized"})
    names = list(dict.fromkeys(f.name for f in faces if f.name))
    if names:
        people = ET.SubElement(ET.SubElement(desc, q(IPTC_EXT, "PersonInImage")), q(RDF, "Bag"))
        for name in names:
            ET.SubElement(people, q(RDF, "li")).text = name
    return desc


def _serialise(root: ET.Element) -> bytes:
    ET.indent(root, space=" ")
    return (PACKET_BEGIN + ET.tostring(root, encoding="unicode") + PACKET_END).encode("utf-8")


def new_packet(width: int, height: int, faces: Iterable[FaceRegion]) -> bytes:
    """A whole sidecar: ``x:xmpmeta`` / ``rdf:RDF`` / the regions' description."""
    meta = ET.Element(q(X, "xmpmeta"), {q(X, "xmptk"): TOOLKIT})
    rdf = ET.SubElement(meta, q(RDF, "RDF"))
    rdf.append(description(width, height, faces))
    return _serialise(meta)


def _register_prefixes(data: bytes) -> None:
    """Keep the sidecar's own prefixes on the way out (ElementTree would write ns0, ns1…);
    faceray's prefixes for its own namespaces stay as they are."""
    ours = set(PREFIXES.values())
    for _, (prefix, uri) in ET.iterparse(io.BytesIO(data), events=("start-ns",)):
        if not prefix or uri in ours or prefix in PREFIXES:
            continue
        try:
            ET.register_namespace(prefix, uri)
        except ValueError:  # ns0-like prefixes are ElementTree's own
            pass


def parse(data: bytes) -> ET.Element:
    """An XMP packet's root element, parsed safely; an ``XmpError`` when it is not XML."""
    import defusedxml.ElementTree as SafeET
    from defusedxml.common import DefusedXmlException

    try:
        return SafeET.fromstring(data)
    except (ET.ParseError, DefusedXmlException, ValueError) as exc:
        raise XmpError(f"not a readable XMP packet: {exc}") from exc


def rdf_root(root: ET.Element) -> ET.Element:
    rdf = root if root.tag == q(RDF, "RDF") else root.find(f".//{q(RDF, 'RDF')}")
    if rdf is None:
        raise XmpError("no rdf:RDF element")
    return rdf


def merge_packet(existing: bytes, width: int, height: int, faces: Iterable[FaceRegion]) -> bytes:
    """``existing`` with its regions and ``PersonInImage`` replaced by ``faces``'; every
    other property kept.  An ``XmpError`` when ``existing`` is not XMP (it is left alone)."""
    root = parse(existing)
    rdf = rdf_root(root)
    try:
        _register_prefixes(existing)
    except ET.ParseError as exc:  # pragma: no cover - parse() above already read it
        raise XmpError(str(exc)) from exc
    for desc in rdf.findall(q(RDF, "Description")):
        old = [c for c in desc if c.tag in REPLACED]
        for child in old:
            desc.remove(child)
        if old and len(desc) == 0 and all(k.startswith(f"{{{RDF}}}") for k in desc.attrib):
            rdf.remove(desc)   # it held only what is replaced
    rdf.append(description(width, height, faces))
    return _serialise(root)
