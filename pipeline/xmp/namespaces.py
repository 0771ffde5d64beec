"""The XMP namespaces faceray reads and writes, with the prefixes photo tools use."""
from __future__ import annotations

X = "adobe:ns:meta/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
MWG_RS = "http://www.metadataworkinggroup.com/schemas/regions/"
ST_DIM = "http://ns.adobe.com/xap/1.0/sType/Dimensions#"
ST_AREA = "http://ns.adobe.com/xmp/sType/Area#"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
MP = "http://ns.microsoft.com/photo/1.2/"
MPRI = "http://ns.microsoft.com/photo/1.2/t/RegionInfo#"
MPREG = "http://ns.microsoft.com/photo/1.2/t/Region#"
XML = "http://www.w3.org/XML/1998/namespace"

PREFIXES = {"x": X, "rdf": RDF, "mwg-rs": MWG_RS, "stDim": ST_DIM, "stArea": ST_AREA,
            "Iptc4xmpExt": IPTC_EXT, "MP": MP, "MPRI": MPRI, "MPReg": MPREG}


def q(ns: str, name: str) -> str:
    """ElementTree's ``{namespace}name``."""
    return f"{{{ns}}}{name}"
