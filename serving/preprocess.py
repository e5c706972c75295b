"""The one preprocessing rule, read from the model card: decode -> EXIF orientation -> RGB ->
resize shorter side (bicubic) -> centre crop. Normalisation happens inside the ONNX graph."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from serving.errors import ImageError, ImageTooLarge

# Decompression-bomb guard: refuse images above this many pixels before decoding them (checked on the
# header's size, so a bomb is never decoded).
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = Union[bytes, str, Path, Image.Image]

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image (bytes, path or PIL image) to an RGB PIL image with EXIF orientation applied."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)) and len(source) == 0:
            raise ImageError("empty image: zero bytes received")
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except FileNotFoundError as err:
            raise ImageError(f"no such file: {source}") from err
        except Image.DecompressionBombError as err:
            raise ImageTooLarge(f"image declares too many pixels ({err})") from err
        except Exception as err:  # PIL raises many kinds for garbage input
            raise ImageError(f"not a decodable image ({type(err).__name__}: {err})") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    if width == 0 or height == 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = _to_rgb(image)
    except Exception as err:
        raise ImageError(f"image could not be decoded, truncated or corrupt ({type(err).__name__}: {err})") from err
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clipping.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white rather than letting it turn black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_model_input(image: Image.Image, input_spec: dict[str, Any]) -> np.ndarray:
    """Resize and crop an RGB image as the model card says; return uint8 ``[H, W, 3]``."""
    out_h, out_w = input_spec["size"]
    resize = input_spec.get("resize", {})
    shorter = int(resize.get("shorter_side", min(out_h, out_w)))
    interpolation = _INTERPOLATION[resize.get("interpolation", "bicubic")]
    width, height = image.size
    scale = shorter / min(width, height)
    new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), interpolation)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    if (left, top, out_w, out_h) != (0, 0, new_w, new_h):
        image = image.crop((left, top, left + out_w, top + out_h))
    return np.asarray(image, dtype=np.uint8)
