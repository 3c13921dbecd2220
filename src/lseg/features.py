"""Dense per-pixel LSeg embeddings as data: extract them, store them, query them with text.

`extract_features` runs one image through the model's processor and an inference protocol and returns
normalised D x h x w features with their geometry; `save_features` / `load_features` /
`read_sidecar` are the on-disk format of `lseg features` (an array plus a json sidecar written last,
the completion marker); `similarity_maps`, `colormap` and `resize_map` turn features and text
embeddings into heatmaps (`lseg query`). See docs/features.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lseg.errors import LSegError
from lseg.images import ImageInput
from lseg.inference import InferenceProtocol, resolve_protocol, run_protocol, scaled_size
from lseg.model.head import upsample_logits
from lseg.precision import model_precision
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


def model_input_size(protocol: InferenceProtocol, height: int, width: int) -> tuple[int, int]:
    """Resolution the model sees at scale 1 for an input of this size under `protocol`."""
    if protocol.base_size is None:
        return height, width
    return scaled_size(height, width, protocol.base_size)


def extract_features(
    model: Any,
    image: ImageInput,
    protocol: str = "single",
    size: int | None = None,
    feature_grid: str = "model",
    dtype: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One image -> (D x h x w float32 tensor normalised over D, geometry metadata).

    `model` is an `LSeg`. `size` is the long side at scale 1: it resizes the input for protocols
    without a base size (single, slide) and replaces the base size of the others (openscene,
    lseg-ms). `feature_grid` "model" returns half the scale-1 resolution (what `LSeg.encode_image`
    gives for single), "image" half the original image resolution. `dtype` is the forward pass's
    precision (`lseg.precision`; default: the model's).
    """
    if feature_grid not in GRIDS:
        raise LSegError(f"unknown feature grid {feature_grid!r}; choose one of: {', '.join(GRIDS)}")
    spec, size = resolve_protocol(protocol, size)
    compute = model_precision(model, dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batch = model.processor.preprocess(image, size, device=model.device, dtype=model.dtype)
            height, width = batch.original_sizes[0]
            seen = model_input_size(spec, *batch.sizes[0])
            grid_of = (height, width) if feature_grid == "image" else seen
            target = ((grid_of[0] + 1) // 2, (grid_of[1] + 1) // 2)
            features = run_protocol(
                model.pixel_embeddings,
                batch.pixel_values,
                spec,
                out_size=target,
                pad_value=model.pad_value,
                dtype=compute,
            )
            features = F.normalize(features.float(), dim=1)[0]
    finally:
        model.train(was_training)
    meta = {
        "image_size": [height, width],
        "model_size": list(seen),
        "feature_size": list(target),
        "feature_stride": [height / target[0], width / target[1]],
        "embed_dim": int(features.shape[0]),
        "protocol_params": {
            "base_size": spec.base_size,
            "crop_size": spec.crop_size,
            "stride": spec.stride,
            "scales": list(spec.scales),
            "flip": spec.flip,
        },
    }
    return features, meta


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
