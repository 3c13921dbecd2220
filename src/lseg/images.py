"""Turn whatever a user has (path, PIL image, array, tensor) into RGB uint8 arrays, robustly."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from lseg.errors import LSegError

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}
# Images whose header claims more pixels than this are refused before decoding (decompression bombs):
# PIL's own default, about 9,459 x 9,459. `set_max_image_pixels` (CLI: --max-image-pixels) changes it.
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
# The largest long side (pixels) the model may be asked to see: beyond it, activations need tens of GB.
MAX_MODEL_SIZE = 4096


def set_max_image_pixels(limit: int | None) -> None:
    """Largest image (width x height) a file may claim; None or 0 lifts the limit (trusted files only)."""
    if limit is not None and limit < 0:
        raise LSegError(f"the image pixel limit must be positive (0 = no limit), got {limit}")
    Image.MAX_IMAGE_PIXELS = limit or None


def check_model_size(size: int | None, option: str = "--size") -> int | None:
    """A long side for the model between 8 and MAX_MODEL_SIZE pixels, or None (the image's own)."""
    if size is not None and not 8 <= size <= MAX_MODEL_SIZE:
        raise LSegError(f"{option} must be between 8 and {MAX_MODEL_SIZE} pixels, got {size}")
    return size


def _too_large(what: str, path: Path, size: str | None) -> LSegError:
    limit = f"the limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
    claim = f"{size}, more than {limit}" if size else f"more than twice {limit}"
    return LSegError(
        f"{what} {path} has {claim} (a decompression bomb?); if you trust it, raise the limit with "
        "--max-image-pixels (Python: lseg.images.set_max_image_pixels)"
    )


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """A fully decoded PIL image from a file, or LSegError (missing, corrupt, truncated, too large)."""
    path = Path(path)
    if not path.is_file():
        raise LSegError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit; we refuse instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise _too_large(what, path, f"{image.width} x {image.height} pixels")
            image.load()
            return image
    except Image.DecompressionBombError:
        raise _too_large(what, path, None) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise LSegError(f"cannot read {what} {path}: {error}") from None


def pil_to_rgb(image: Image.Image, *, exif_orientation: bool = True) -> np.ndarray:
    """RGB uint8; 16-bit images are rescaled, alpha is composited on white.

    `exif_orientation`: turn the pixels as the EXIF tag says (a photo as its camera meant it shown).
    False keeps the stored pixels: a dataset's masks were drawn on those (HSNet and LSeg read them so).
    """
    if 0 in image.size:
        raise LSegError(f"the image is empty ({image.width} x {image.height} pixels)")
    if exif_orientation:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        return np.repeat((array / top * 255).round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy


def load_image(source: ImageInput, *, exif_orientation: bool = True) -> np.ndarray:
    """H x W x 3 uint8 RGB from a path, PIL image, HxW[xC] array or CHW tensor (uint8 or [0, 1] float).

    `exif_orientation=False` reads a file's pixels as stored, ignoring its EXIF rotation: what a
    dataset image needs to stay aligned with its mask (`pil_to_rgb`).
    """
    if isinstance(source, (str, Path)):
        return pil_to_rgb(open_image(source), exif_orientation=exif_orientation)
    if isinstance(source, Image.Image):
        return pil_to_rgb(source, exif_orientation=exif_orientation)
    if isinstance(source, torch.Tensor):
        if source.ndim != 3 or source.shape[0] not in (1, 3, 4):
            raise LSegError(f"tensor images must be C x H x W with C in 1, 3, 4; got {tuple(source.shape)}")
        tensor = source.detach().cpu()
        if tensor.is_floating_point():
            tensor = (tensor.clamp(0, 1) * 255).round()
        source = tensor.to(torch.uint8).permute(1, 2, 0).numpy()
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise LSegError(f"array images must be H x W, H x W x 3 or H x W x 4; got {source.shape}")
        if 0 in array.shape[:2]:
            raise LSegError(f"the image is empty ({array.shape[1]} x {array.shape[0]} pixels)")
        if array.dtype == np.uint16:
            array = (array / 257).round().astype(np.uint8)
        elif array.dtype != np.uint8:
            raise LSegError(f"array images must be uint8 or uint16, got {array.dtype}")
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        if array.shape[2] == 4:
            return pil_to_rgb(Image.fromarray(array, mode="RGBA"))
        return np.ascontiguousarray(array)
    raise LSegError(
        f"unsupported image type {type(source).__name__}; give a path, PIL image, array or tensor"
    )


def expand_paths(inputs: list[str | Path], suffixes: set[str], kind: str) -> list[Path]:
    """Files as given; folders expand (non-recursively) to their sorted, non-hidden `suffixes` files."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith(".")
            )
            if not found:
                raise LSegError(f"no {kind}s in directory {item} (looked for {', '.join(sorted(suffixes))})")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise LSegError(f"{kind} not found: {item}")
    return paths


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and directories (non-recursive) into a sorted list of image paths."""
    return expand_paths(inputs, IMAGE_SUFFIXES, "image")


def long_side_size(height: int, width: int, size: int | None) -> tuple[int, int]:
    """(H, W) of an image whose long side is resized to `size` (None: unchanged), aspect kept."""
    if size is None:
        return int(height), int(width)
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_bilinear(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resampling of B x C x h x w maps (images, logits, features) to `size` between two
    resolutions of one picture: half-pixel centres (align_corners=False, as PIL, torchvision and
    OpenCV), antialiased when shrinking.

    The one convention for every resize between an image's own resolution and the model's (images
    down, logits and heat maps back up, protocol scales), so pixel i of one grid and its image lands on
    the same place in the other. Half-precision maps are resampled in float32 (antialiasing has no
    bfloat16 CPU kernel) and cast back.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    shrinking = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    source = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    resized = F.interpolate(source, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return resized.to(maps.dtype)


def resize_long_side(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Float B x 3 x H x W in [0, 1] with the long side resized to `size` (`resize_bilinear`)."""
    if size is None:
        return images
    new_size = long_side_size(*images.shape[-2:], size)
    if new_size == tuple(images.shape[-2:]):
        return images
    return resize_bilinear(images, new_size).clamp(0, 1)
