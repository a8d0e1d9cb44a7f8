"""Image and label-PNG decoding that fails loudly, and atomic label-PNG writes.

``read_image`` decodes with OpenCV (``imdecode`` of the file bytes, ``IMREAD_UNCHANGED``) and
normalizes every layout to ``uint8 (H, W, 3)`` RGB:

- grayscale (and gray+alpha) → the gray value in all three channels;
- BGRA → RGB with the alpha channel **dropped** (colour kept as stored, as PIL's
  ``convert("RGB")`` does — the conversion the published WSSS loaders use);
- 16-bit → 8-bit by ``>> 8``; palette PNGs → their RGB colours;
- the EXIF orientation tag is **not** applied, so images stay aligned with their label PNGs.

Before decoding, the container structure of JPEG, PNG, BMP and WebP files is checked, because
a decoder may turn a truncated file into an image with a grey or black tail and only a warning.
The image size is read from the header (JPEG, PNG, BMP, GIF, WebP, TIFF, PNM) and an image above
the pixel limit (``DEFAULT_MAX_PIXELS``, or ``WSSS_FAST_MAX_IMAGE_PIXELS``, or the ``max_pixels``
argument; 0 means no limit) is refused before the decoder allocates it: one 12000×12000 photo
would take 430 MB decoded, and several in flight can take a run down.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
from PIL import Image

from wsss_fast.data.classes import voc_palette
from wsss_fast.io.atomic import atomic_write_bytes

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "WSSS_FAST_MAX_IMAGE_PIXELS"
# JPEG start-of-frame markers (all coding processes; C4, C8 and CC are other segments)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageDecodeError(ValueError):
    """An image or label file that cannot be decoded; the message names the path."""


def _read_bytes(path) -> bytes:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ImageDecodeError(f"{path}: is a directory, not an image file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise ImageDecodeError(f"{path}: empty file (0 bytes)")
    return data


def _jpeg_problem(data: bytes) -> str | None:
    """Walk the JPEG marker segments (skipping entropy-coded data) up to the end-of-image marker;
    the EOI found by this walk cannot be one inside an embedded EXIF thumbnail."""
    size, pos = len(data), 2
    truncated = "truncated JPEG (no end-of-image marker)"
    while True:
        pos = data.find(b"\xff", pos)  # libjpeg skips stray bytes before a marker too
        if pos < 0:
            return truncated
        while pos < size and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= size:
            return truncated
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return None
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue  # standalone markers carry no length field
        if pos + 2 > size:
            return truncated
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return f"corrupt JPEG (segment length {length} at byte {pos})"
        pos += length
        if pos > size:
            return truncated
        if marker == 0xDA:  # start of scan: entropy-coded data until a real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= size:
                    return truncated
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2  # stuffed 0xFF byte or restart marker: still inside the scan
                elif following == 0xFF:
                    pos += 1
                else:
                    break


def _png_problem(data: bytes) -> str | None:
    """Walk the PNG chunks up to IEND."""
    size, pos = len(data), len(_PNG_SIGNATURE)
    while pos + 8 <= size:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        pos += 12 + length
        if pos > size:
            break
        if kind == b"IEND":
            return None
    return "truncated PNG (no IEND chunk)"


def _bmp_problem(data: bytes) -> str | None:
    """Check that an uncompressed BMP holds all the pixel rows its header announces."""
    if len(data) < 34:
        return "truncated BMP header"
    offset = int.from_bytes(data[10:14], "little")
    if int.from_bytes(data[14:18], "little") < 40:
        return None  # old OS/2 header: leave it to the decoder
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)
    bits = int.from_bytes(data[28:30], "little")
    compression = int.from_bytes(data[30:34], "little")
    if compression not in (0, 3):  # run-length coded: size not known from the header
        return None
    stride = (abs(width) * bits + 31) // 32 * 4
    if len(data) < offset + stride * abs(height):
        return "truncated BMP (fewer pixel rows than the header announces)"
    return None


def _container_problem(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8"):
        return _jpeg_problem(data)
    if data.startswith(_PNG_SIGNATURE):
        return _png_problem(data)
    if data.startswith(b"BM"):
        return _bmp_problem(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        if len(data) < 8 + int.from_bytes(data[4:8], "little"):
            return "truncated WebP (file shorter than its RIFF size)"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment."""
    size, pos = len(data), 2
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0:
            return None
        while pos < size and data[pos] == 0xFF:
            pos += 1
        if pos + 3 > size:
            return None
        marker = data[pos]
        pos += 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        if marker in _JPEG_SOF and pos + 7 <= size:
            return (int.from_bytes(data[pos + 5:pos + 7], "big"),
                    int.from_bytes(data[pos + 3:pos + 5], "big"))
        pos += max(int.from_bytes(data[pos:pos + 2], "big"), 2)


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first IFD's ImageWidth/ImageLength tags (classic TIFF)."""
    order = "little" if data[:2] == b"II" else "big"
    if len(data) < 8 or int.from_bytes(data[2:4], order) != 42:
        return None
    offset = int.from_bytes(data[4:8], order)
    if offset + 2 > len(data):
        return None
    dims = {}
    for i in range(int.from_bytes(data[offset:offset + 2], order)):
        entry = data[offset + 2 + 12 * i:offset + 14 + 12 * i]
        if len(entry) < 12:
            break
        tag, kind = int.from_bytes(entry[0:2], order), int.from_bytes(entry[2:4], order)
        if tag in (256, 257):
            dims[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
    return (dims[256], dims[257]) if len(dims) == 2 else None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    tokens = []
    for line in data[2:512].split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            break
    return (int(tokens[0]), int(tokens[1])) if len(tokens) >= 2 and all(
        t.isdigit() for t in tokens[:2]) else None


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` read from an image file's header without decoding it, for JPEG, PNG,
    BMP, GIF, WebP, TIFF and PNM files; None for other formats or an unreadable header."""
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"BM") and len(data) >= 26:
        if int.from_bytes(data[14:18], "little") == 12:  # OS/2 header: 16-bit fields
            return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
        return (abs(int.from_bytes(data[18:22], "little", signed=True)),
                abs(int.from_bytes(data[22:26], "little", signed=True)))
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return (int.from_bytes(data[24:27], "little") + 1,
                    int.from_bytes(data[27:30], "little") + 1)
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 ":
            return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                    int.from_bytes(data[28:30], "little") & 0x3FFF)
        return None
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(data)
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return _pnm_size(data)
    return None


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else ``WSSS_FAST_MAX_IMAGE_PIXELS``,
    else ``DEFAULT_MAX_PIXELS``; 0 means no limit."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(float(text))
        except ValueError:
            raise ValueError(f"{MAX_PIXELS_ENV}={text!r}: expected a number of pixels "
                             f"(0 = no limit)") from None
    if max_pixels < 0:
        raise ValueError(f"the pixel limit must be >= 0 (0 = no limit), got {max_pixels}")
    return int(max_pixels)


def _check_pixels(path: str, size: tuple[int, int] | None, max_pixels: int | None) -> None:
    limit = max_image_pixels(max_pixels)
    if size is None or not limit or size[0] * size[1] <= limit:
        return
    width, height = size
    raise ImageDecodeError(
        f"{path}: too large: {width * height / 1e6:.1f} MP ({width}×{height}) exceeds the "
        f"{limit / 1e6:g} MP limit; set {MAX_PIXELS_ENV} (pixels, 0 = no limit) to read it")


def read_image(path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to ``uint8 (H, W, 3)`` RGB, C-contiguous.

    Raises ``ImageDecodeError`` (naming the path) for a missing, empty, truncated, corrupt or
    non-image file, a directory, an unsupported pixel type, or an image of more pixels than
    ``max_image_pixels(max_pixels)`` (checked on the header, before decoding).
    """
    data = _read_bytes(path)
    path = os.fspath(path)
    _check_pixels(path, image_size(data), max_pixels)
    problem = _container_problem(data)
    if problem is not None:
        raise ImageDecodeError(f"{path}: {problem}")
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise ImageDecodeError(
            f"{path}: not a decodable image (unknown format or corrupt data; "
            f"first bytes {data[:8]!r})")
    _check_pixels(path, (decoded.shape[1], decoded.shape[0]), max_pixels)  # other formats
    if decoded.dtype == np.uint16:
        decoded = (decoded >> 8).astype(np.uint8)
    elif decoded.dtype != np.uint8:
        raise ImageDecodeError(
            f"{path}: unsupported pixel type {decoded.dtype} (expected 8- or 16-bit integers)")
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    if channels in (1, 2):
        gray = decoded if decoded.ndim == 2 else decoded[:, :, 0]
        return cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    raise ImageDecodeError(f"{path}: unsupported channel count {channels}")


def read_label_png(path, max_pixels: int | None = None) -> np.ndarray:
    """Read a label image (palette or grayscale PNG) as ``uint8 (H, W)`` class indices.

    Palette images give their palette indices (not colours). Colour images are refused, and so
    are images above the pixel limit (as for ``read_image``).
    """
    data = _read_bytes(path)
    path = os.fspath(path)
    _check_pixels(path, image_size(data), max_pixels)
    problem = _container_problem(data)
    if problem is not None:
        raise ImageDecodeError(f"{path}: {problem}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            values = np.array(image)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for bad image data
        raise ImageDecodeError(f"{path}: not a decodable label image ({exc})") from None
    if mode in ("P", "L", "1"):
        return np.ascontiguousarray(values, dtype=np.uint8)
    if mode.startswith("I") and values.ndim == 2:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ImageDecodeError(
                f"{path}: label values must lie in 0..255, got {values.min()}..{values.max()}")
        return values.astype(np.uint8)
    raise ImageDecodeError(
        f"{path}: a label image must be single-channel (palette or grayscale), got mode {mode}")


def encode_label_png(label: np.ndarray, palette: bool = True) -> bytes:
    """PNG bytes of a ``(H, W)`` label map with values 0..255: a palette image with the VOC
    colours (like ``SegmentationClass``) or a plain 8-bit index image (``SegmentationClassAug``)."""
    if not isinstance(label, np.ndarray) or label.ndim != 2:
        shape = getattr(label, "shape", None)
        raise ValueError(f"label must be a 2-D numpy array, got {type(label).__name__} "
                         f"with shape {shape}")
    if label.dtype != np.uint8:
        if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
            raise ValueError(f"label must have an integer dtype, got {label.dtype}")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(label))
    if palette:
        image.putpalette(voc_palette().tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_label_png(path, label: np.ndarray, palette: bool = True) -> None:
    """Atomically write a ``(H, W)`` label map (values 0..255) as a PNG (``encode_label_png``)."""
    atomic_write_bytes(path, encode_label_png(label, palette))
