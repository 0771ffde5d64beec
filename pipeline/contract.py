"""What the whole product agrees on (DESIGN.md): statuses, task kinds, the formats it
reads, and the errors that mean "misuse" rather than "bug".

Every other module imports these names instead of repeating literals, so a format added
here is listed, decoded and accepted over HTTP at once.
"""
from __future__ import annotations

#: Prediction-table statuses of a photo (or video).
OK, NO_FACE, DECODE_ERROR, READ_ERROR, TOO_LARGE = "ok", "no_face", "decode_error", "read_error", "too_large"
STATUSES: tuple[str, ...] = (OK, NO_FACE, DECODE_ERROR, READ_ERROR, TOO_LARGE)

#: Task kinds of a model bundle; the label of a face an open-set task rejects.
CLASSIFICATION, REGRESSION = "classification", "regression"
UNKNOWN = "unknown"

# Built-in attributes (DESIGN.md): every face's age, gender and emotion, in column order.
# Here, not in pipeline/attributes.py (which loads torch), so a driver can name the columns.
ATTRIBUTE_TASKS: tuple[tuple[str, str], ...] = (("age", "regression"), ("gender", "classification"),
                                                ("emotion", "classification"))

#: Photos with more pixels are ``too_large`` unless a setting says otherwise.
DEFAULT_MAX_PIXELS = 120_000_000

#: Length of the identity embedding (dlib's ResNet), the table's ``embedding`` column.
EMBEDDING_DIM = 128

#: The one list of photo formats: (name, Pillow opener ids, file extensions, media type).
#: Listing, the decoder and ``POST /v1/faces`` all read it.
PHOTO_FORMATS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], ...] = (
    ("jpeg", ("JPEG",), (".jpg", ".jpeg", ".jpe", ".jfif"), "image/jpeg"),
    ("png", ("PNG",), (".png",), "image/png"),
    ("webp", ("WEBP",), (".webp",), "image/webp"),
    ("bmp", ("BMP",), (".bmp",), "image/bmp"),
    ("tiff", ("TIFF",), (".tif", ".tiff"), "image/tiff"),
    ("gif", ("GIF",), (".gif",), "image/gif"),
    ("heif", ("HEIF",), (".heic", ".heif", ".hif"), "image/heif"),
    ("avif", ("AVIF",), (".avif",), "image/avif"),
)
PHOTO_EXTENSIONS: frozenset[str] = frozenset(e for _, _, exts, _ in PHOTO_FORMATS for e in exts)
PILLOW_FORMATS: tuple[str, ...] = tuple(p for _, names, _, _ in PHOTO_FORMATS for p in names)
PHOTO_MEDIA_TYPES: tuple[str, ...] = tuple(sorted({t for *_, t in PHOTO_FORMATS} | {"image/heic"}))
PHOTO_FORMAT_NAMES = "JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC/HEIF, AVIF"

#: Videos (DESIGN.md "Videos"): listed beside photos once the video path exists.
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"})


class UsageError(ValueError):
    """The user asked for something that cannot work (a bad flag, a missing bucket or
    model, a flag this cluster cannot honour).  Jobs print its one line and exit 2;
    every other exception is a bug and keeps its traceback."""


class ModelFileError(UsageError):
    """A model file (weights, detector, attribute network, bundle) is missing, unreadable
    or not the network expected; the message names the file."""


def extension(path: str) -> str:
    """The lower-case extension of a path or URI, with its dot."""
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def sniff_photo(data: bytes) -> str | None:
    """The photo format named by the first bytes (a name of ``PHOTO_FORMATS``), or None.

    Decided by content, never by a file name or Content-Type a client sends.
    """
    head = data[:32]
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[4:8] == b"ftyp":  # ISO base media: the brand says HEIF, AVIF or a video
        end = min(len(head), int.from_bytes(head[:4], "big") or len(head))
        brands = {head[i:i + 4] for i in range(8, end - 3, 4)}
        if brands & {b"avif", b"avis"}:
            return "avif"
        if brands & {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}:
            return "heif"
    return None
