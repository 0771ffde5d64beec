"""Exchange with photo tools: face regions as XMP (DESIGN.md "Exchange with photo tools").

- ``regions``: geometry between the table's pixel boxes and XMP's normalised areas,
  EXIF orientation, IoU matching;
- ``write``: a sidecar packet (new, or merged into an existing sidecar);
- ``read``: MWG and Microsoft Photo regions from a sidecar or a photo's embedded XMP;
- ``export`` / ``importing``: the two jobs' work (``jobs/export_xmp.py``, ``jobs/import_xmp.py``).
"""
