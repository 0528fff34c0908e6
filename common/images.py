"""Image files: which names count as images, and decoding them to 8-bit RGB under a pixel limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from leukfed.common.data_files import MAX_IMAGE_PIXELS, open_regular, shown
from leukfed.common.errors import LeukError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


def is_image_file(name: str) -> bool:
    """True for the supported image extensions (case-insensitive)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB; LeukError naming the file if it cannot, or if
    its header declares more than `max_pixels` pixels (checked before decoding)."""
    path = Path(path)
    try:
        with open_regular(path) as fh, Image.open(fh) as im:
            check_pixels(im, max_pixels)
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise LeukError(f"image not found: {shown(str(path))}") from None
    except LeukError as exc:
        raise LeukError(f"cannot read image {shown(str(path))}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise LeukError(f"cannot read image {shown(str(path))}: {image_error_reason(exc)}") from None


def check_pixels(im: Image.Image, max_pixels: int) -> None:
    """LeukError when an opened (not yet decoded) image declares more than `max_pixels` pixels."""
    if im.width * im.height > max_pixels:
        raise LeukError(f"{im.width}x{im.height} pixels is over the limit of {max_pixels:,} "
                        "(header checked before decoding)")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit/float rescaled."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I") or mode == "F":
        return _deep_to_rgb(im)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "1":
        im = im.convert("L")
    try:
        return im.convert("RGB")
    except ValueError:
        raise LeukError(f"unsupported image mode {mode}") from None


def _deep_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grey images to 8 bit."""
    arr = np.asarray(im).astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        scaled = arr / 257.0  # 16-bit source: 65535 -> 255
    elif im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = arr / 257.0
    else:
        scaled = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def image_error_reason(exc: BaseException) -> str:
    """One line saying why Pillow could not open or decode an image."""
    if isinstance(exc, Image.DecompressionBombError):
        return "the header declares more pixels than Pillow's decompression-bomb limit"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
