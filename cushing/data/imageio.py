"""Robust photo decoding shared by the face stage and the served model.

Every way a photo can be bad maps to a reason code; every odd mode converts to RGB correctly (16-bit scaled,
not clipped; alpha and palette composited on white; CMYK converted). Decompression bombs are refused from the
header, before any pixel is decoded, so memory stays bounded.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BadImage", "open_rgb", "REASONS", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 64_000_000

REASONS = {
    "file_not_found": "the photo file does not exist",
    "empty_file": "the file has 0 bytes",
    "not_an_image": "not an image format Pillow recognises (wrong content for its name?)",
    "truncated": "the image data ends early (truncated file)",
    "corrupt": "the image data could not be decoded",
    "decompression_bomb": "more pixels than allowed (possible decompression bomb)",
    "unreadable": "the file could not be read",
    "unsupported_mode": "an image mode that cannot be converted to RGB",
}


@dataclass
class BadImage(Exception):
    reason: str
    detail: str = ""
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.reason}: {REASONS.get(self.reason, '')}{' (' + self.detail + ')' if self.detail else ''}"


def _to_rgb(im) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # scaled to 8 bits, not clipped
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        else:
            peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return np.repeat(np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("P", "PA", "RGBA", "LA", "La", "RGBa"):  # transparency composited on white
        im = im.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB"))
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as e:
        raise BadImage("unsupported_mode", f"mode {im.mode}: {e}") from None


def open_rgb(src: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] with EXIF orientation applied, or BadImage with a reason code (naming the file, for a path).

    `draft` lets JPEG decode at a reduced scale (DCT scaling) when the photo is far larger than needed."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    label = "" if isinstance(src, bytes) else str(src)
    try:
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
    except OSError as e:
        raise BadImage("unreadable", e.strerror or str(e), label) from None
    if len(data) == 0:
        raise BadImage("empty_file", source=label)
    try:
        with warnings.catch_warnings():  # the size check below is ours; Pillow's warning adds nothing
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise BadImage("decompression_bomb", f"{w}x{h} = {w * h:,} pixels > {max_pixels:,}", label)
        if draft and im.format == "JPEG":
            im.draft("RGB", (draft, draft))
        im.load()
        return _to_rgb(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        raise BadImage("not_an_image", source=label) from None
    except Image.DecompressionBombError as e:
        raise BadImage("decompression_bomb", str(e)[:120], label) from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() or "end of file" in str(e).lower() else "corrupt"
        raise BadImage(reason, str(e)[:120], label) from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise BadImage("corrupt", f"{type(e).__name__}: {str(e)[:120]}", label) from None
