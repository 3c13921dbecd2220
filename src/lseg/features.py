"""Dense per-pixel LSeg embeddings as data: store them, read them, query them with text.

Features come from `lseg.predictor.LSegPredictor` (`outputs={"features"}`, or `LSeg.encode_image`);
`save_features` / `load_features` / `read_sidecar` are the on-disk format of `lseg features` (an array
plus a json sidecar written last, the completion marker); `similarity_maps`, `colormap` and
`resize_map` turn features and text embeddings into heatmaps (`lseg query`). See docs/features.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lseg.errors import LSegError
from lseg.model.head import upsample_logits
from lseg.processing import resize_logits

GRIDS = ("model", "image")
# Viridis, sampled at 9 evenly spaced points (perceptually uniform, colour-blind safe).
VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=np.float32,
)


def save_features(array: np.ndarray, meta: dict[str, Any], out: Path, name: str, fmt: str) -> None:
    """Array first, then the json sidecar (the completion marker)."""
    from lseg.files import save_array, write_atomic, write_json_atomic

    array_path = out / f"{name}.{fmt}"
    if fmt == "npy":
        save_array(array, array_path)
    else:
        write_atomic(array_path, lambda f: torch.save(torch.from_numpy(array), f))
    write_json_atomic(out / f"{name}.json", {**meta, "array": array_path.name})


def load_features(path: str | Path) -> np.ndarray:
    """A D x h x w array from `.npy` (memory-mapped) or `.pt`; LSegError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LSegError(f"feature file not found: {path}")
    try:
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.suffix == ".pt":
            tensor = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise LSegError(f"{path} does not hold a single tensor")
            array = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        else:
            raise LSegError(f"unsupported feature file {path}: expected .npy or .pt")
    except LSegError:
        raise
    except Exception as error:  # numpy/torch raise many types for truncated or foreign files
        raise LSegError(f"cannot read features {path}: {str(error).splitlines()[0]}") from error
    if array.ndim != 3:
        raise LSegError(f"{path} holds shape {tuple(array.shape)}; expected D x h x w features")
    return array


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def similarity_maps(features: Any, text_embeddings: Any) -> np.ndarray:
    """N x h x w cosine similarities of a D x h x w feature map with N x D text embeddings (float32)."""
    feats = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: also of read-only memmaps
    text = torch.from_numpy(np.array(text_embeddings, dtype=np.float32))
    text = text.reshape(1, -1) if text.ndim == 1 else text
    if feats.ndim != 3:
        raise LSegError(f"features must be D x h x w, got shape {tuple(feats.shape)}")
    if feats.shape[0] != text.shape[1]:
        raise LSegError(
            f"features have {feats.shape[0]} channels but the text embedding has {text.shape[1]}: "
            "query with the checkpoint that wrote the features"
        )
    return torch.einsum("dhw,nd->nhw", F.normalize(feats, dim=0), F.normalize(text, dim=1)).numpy()


def similarity_map(features: Any, text_embedding: Any) -> np.ndarray:
    """h x w cosine similarities of a D x h x w feature map with one D text embedding."""
    return similarity_maps(features, np.asarray(text_embedding).reshape(1, -1))[0]


def colormap(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """h x w values -> h x w x 3 uint8 viridis colours; range [vmin, vmax] (default: min..max)."""
    low = float(values.min()) if vmin is None else vmin
    high = float(values.max()) if vmax is None else vmax
    scaled = np.clip((values - low) / (high - low), 0, 1) if high > low else np.zeros_like(values)
    position = scaled * (len(VIRIDIS) - 1)
    index = np.minimum(position.astype(np.int64), len(VIRIDIS) - 2)
    fraction = (position - index)[..., None]
    colours = VIRIDIS[index] * (1 - fraction) + VIRIDIS[index + 1] * fraction
    return colours.round().astype(np.uint8)


def resize_map(values: np.ndarray, size: tuple[int, int], model_size: tuple[int, int]) -> np.ndarray:
    """An h x w map of the stride-2 grid (features, similarities) at `size` (H, W), the way logits
    become label maps: upsampled to `model_size` (the size the model saw) as the network does
    (`upsample_logits`), then resized to `size` (`resize_logits`), so a heat map lines up with the
    label map `segment` draws from the same grid."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return resize_logits(upsample_logits(tensor, model_size), size)[0, 0].numpy()
