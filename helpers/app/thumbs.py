"""Thumbnails made on demand and kept in a bounded in-memory cache (least recently used dropped first), and the
full image of a row in a form every browser shows."""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_THUMB_SIZE = 256
DEFAULT_CACHE_BYTES = 64 * 2**20
#: Formats served as they are on disk for the full image; others (TIFF...) are converted to JPEG.
BROWSER_FORMATS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                   ".webp": "image/webp", ".bmp": "image/bmp"}


def encode_jpeg(image, quality: int = 85) -> bytes:
    """``image`` (RGB PIL) as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def make_thumbnail(path: str | os.PathLike, size: int = DEFAULT_THUMB_SIZE) -> bytes:
    """A JPEG of ``path`` at most ``size`` pixels a side (the project's robust loader, JPEG draft decoding)."""
    from ..data import load_image

    image = load_image(path, draft_size=size)
    image.thumbnail((size, size))
    return encode_jpeg(image)


class ThumbnailCache:
    """Thumbnails by row id, at most ``max_bytes`` of JPEG kept (least recently used dropped first)."""

    def __init__(self, size: int = DEFAULT_THUMB_SIZE, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, row: int, path: Path) -> bytes:
        """The thumbnail of row ``row`` (file ``path``), made on the first request."""
        with self._lock:
            if row in self._items:
                self._items.move_to_end(row)
                return self._items[row]
        data = make_thumbnail(path, self.size)
        with self._lock:
            if row not in self._items:
                self._items[row] = data
                self.bytes += len(data)
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)
        return data


def full_image(path: Path) -> tuple[bytes | Path, str]:
    """(the file itself or JPEG bytes, media type): browsers' formats as they are, anything else as JPEG."""
    media = BROWSER_FORMATS.get(path.suffix.lower())
    if media is not None:
        return path, media
    from ..data import load_image

    return encode_jpeg(load_image(path), quality=92), "image/jpeg"
