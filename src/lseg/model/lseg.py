"""LSeg: a frozen text encoder embeds labels, a DPT image encoder embeds pixels; logits are their
scaled cosine similarities, so one model segments with whatever labels it is given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import CommitInfo
from torch import nn

from lseg.device import resolve_device
from lseg.errors import LSegError
from lseg.images import ImageInput, load_image, resize_long_side
from lseg.model.card import save_card
from lseg.model.checkpoint import read_checkpoint, save_model
from lseg.model.config import LSegConfig, load_preset
from lseg.model.dpt import DPTDecoder
from lseg.model.head import LSegHead
from lseg.model.hub import push_folder
from lseg.model.image_encoder import build_image_encoder, pad_to_multiple
from lseg.model.text_encoder import build_text_encoder, validate_labels
from lseg.model.weights import load_state, resolve_dtype


@dataclass
class SegmentationResult:
    """One image's segmentation at its original resolution."""

    label_map: np.ndarray  # H x W int64, index into `labels`
    scores: np.ndarray  # N x H x W float32 softmax probabilities
    labels: list[str]

    def shares(self) -> dict[str, float]:
        """Fraction of pixels assigned to each label."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.labels))
        return {label: float(c) / self.label_map.size for label, c in zip(self.labels, counts)}


class LSeg(nn.Module):
    """Language-driven semantic segmentation model (Li et al., ICLR 2022).

    `forward(pixel_values, labels_or_embeddings)` takes normalised B x 3 x H x W images of any size and
    returns B x N x H x W logits. `segment`, `encode_image` and `encode_text` are the user-facing API.
    """

    def __init__(self, config: LSegConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = build_text_encoder(config.text_encoder, load_pretrained=load_pretrained)
        image_cfg = config.image_encoder
        if not load_pretrained and image_cfg.pretrained:
            image_cfg = type(image_cfg)(**{**image_cfg.__dict__, "pretrained": False})
        self.image_encoder = build_image_encoder(image_cfg)
        self.decoder = DPTDecoder(self.image_encoder.out_channels, config.features, config.use_bn)
        self.head = LSegHead(
            config.features,
            self.text_encoder.embed_dim,
            logit_scale=config.logit_scale,
            learn_logit_scale=config.learn_logit_scale,
            regularizer=config.regularizer,
            regularizer_depth=config.regularizer_depth,
            regularizer_activation=config.regularizer_activation,
        )
        self.register_buffer("pixel_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------- construction and weights
    @classmethod
    def from_config(cls, config: str | dict[str, Any] | LSegConfig, pretrained: bool = True) -> LSeg:
        """Build from a preset name ("tiny", "vit_b16", "vit_l16", ...), a dict or an LSegConfig.

        `pretrained=False` builds random weights without any download (tests, benchmarks).
        """
        if isinstance(config, str):
            config = load_preset(config)
        elif isinstance(config, dict):
            config = LSegConfig.from_dict(config)
        return cls(config, load_pretrained=pretrained)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> LSeg:
        """Load a `save_pretrained` folder (or its `.safetensors` file), a Hugging Face Hub repo id
        (`owner/name`), or a Lightning / original LSeg `.ckpt`.

        Hub repos are read through the Hugging Face cache: `revision` (branch, tag or commit),
        `cache_dir`, `local_files_only` and `token` are passed to it. The model is returned on `device`
        (auto, cpu, cuda, cuda:N), its floating weights cast to `dtype` (e.g. torch.bfloat16) if given.
        """
        target, cast = resolve_device(device), resolve_dtype(dtype)  # fail before reading any weights
        config, state, source = read_checkpoint(
            id_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        model = load_state(cls(config, load_pretrained=False), state, source)
        return model.to(target, cast)

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        metrics: Mapping[str, Any] | None = None,
        card_data: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write `model.safetensors`, `config.json` and a model card `README.md` into `directory`, each
        atomically.

        The card records `metrics` (a report as `lseg evaluate` writes in metrics.json) and Hub
        metadata from `card_data` (e.g. license, datasets). Other files in the folder are left alone,
        and so is a README.md that lseg did not write or that was edited since (a warning says so).
        An existing file at `directory` is refused (LSegError).
        """
        folder = save_model(directory, self.config, self.state_dict())
        save_card(folder, self.config, metrics, card_data)
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload LSeg model",
        revision: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        card_data: Mapping[str, Any] | None = None,
    ) -> CommitInfo:
        """Upload the `save_pretrained` files as one commit to Hub repo `repo_id` (created if missing).

        `revision` is the branch (created from main if missing); `metrics` and `card_data` go into the
        model card as with `save_pretrained`. Returns huggingface_hub's CommitInfo (`.commit_url`).
        """
        card = {"model_name": repo_id, **(card_data or {})}
        return push_folder(
            lambda folder: self.save_pretrained(folder, metrics=metrics, card_data=card),
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_encoder.set_grad_checkpointing(enable)

    # ----------------------------------------------------------------- tensors in, tensors out
    # The one place that says where the model lives: `.to(device)` / `.to(torch.bfloat16)` move this
    # buffer with the weights, and images and label embeddings are cast to match it.
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pixel_mean.dtype

    def encode_text(self, labels: str | Sequence[str]) -> torch.Tensor:
        """N x D label embeddings, L2-normalised (cached; the text encoder is frozen).

        `labels` is a list of strings or one comma-separated string ("cat, dog").
        """
        return self.text_encoder.encode(labels).to(self.device, self.dtype)

    def decode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Decoder output (stride 2) of the input padded to the encoder's multiple."""
        padded = pad_to_multiple(pixel_values, self.image_encoder.pad_multiple)
        return self.decoder(self.image_encoder(padded))

    def classify(self, decoded: torch.Tensor, text: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits of `decode`'s output against N x D label embeddings, cropped to the input `size`."""
        return self.head(decoded, text)[..., : size[0], : size[1]]

    def pixel_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised B x D x ceil(H/2) x ceil(W/2) embeddings of normalised B x 3 x H x W images."""
        height, width = pixel_values.shape[-2:]
        embeddings = self.head.embed(self.decode(pixel_values))
        return embeddings[..., : (height + 1) // 2, : (width + 1) // 2]

    def forward(self, pixel_values: torch.Tensor, labels: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """B x N x H x W logits for normalised images and N labels (or N x D label embeddings)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise LSegError(f"pixel_values must be B x 3 x H x W, got {tuple(pixel_values.shape)}")
        text = labels if isinstance(labels, torch.Tensor) else self.encode_text(labels)
        return self.classify(self.decode(pixel_values), text, pixel_values.shape[-2:])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float B x 3 x H x W -> model input, on the model's device and in its dtype."""
        if not images.is_floating_point():
            images = images.float() / 255
        images = images.to(self.device, torch.float32)
        return ((images - self.pixel_mean.float()) / self.pixel_std.float()).to(self.dtype)

    # ----------------------------------------------------------------- user-facing API
    def preprocess(self, image: ImageInput, size: int | None = None) -> torch.Tensor:
        """Any supported image -> normalised 1 x 3 x H x W tensor, long side resized to `size` if given."""
        tensor = torch.from_numpy(load_image(image)).permute(2, 0, 1).unsqueeze(0).float() / 255
        return self.normalize(resize_long_side(tensor, size))

    @torch.inference_mode()
    def segment(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str] | None = None,
        size: int | None = None,
        protocol: str = "single",
        batch_size: int = 1,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image (or a list) with the given label words; results at original resolution.

        `labels` is a list of strings or one comma-separated string; default: the config's labels.

        `size` is the long side the model sees (at scale 1 for multi-scale protocols); `protocol` is
        single, slide, lseg-ms or openscene (`lseg.inference`). Up to `batch_size` consecutive images
        of the same size share a forward pass.
        """
        from lseg.inference import resolve_protocol, run_protocol

        if batch_size < 1:
            raise LSegError(f"batch_size must be at least 1, got {batch_size}")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        labels = validate_labels(self.config.labels if labels is None else labels)
        text = self.encode_text(labels)
        spec, size = resolve_protocol(protocol, size)
        was_training = self.training
        self.eval()
        results = []
        try:
            for start in range(0, len(items), batch_size):
                originals = [load_image(item) for item in items[start : start + batch_size]]
                inputs = [self.preprocess(original, size) for original in originals]
                for group in _same_size_runs(originals, inputs):
                    logits = run_protocol(
                        lambda batch: self(batch, text),
                        torch.cat([inputs[i] for i in group]),
                        spec,
                        out_size=originals[group[0]].shape[:2],
                        amp=self.device.type == "cuda",
                    ).float()
                    for scores in logits.softmax(dim=1):
                        results.append(
                            SegmentationResult(
                                label_map=scores.argmax(dim=0).cpu().numpy(),
                                scores=scores.cpu().numpy(),
                                labels=labels,
                            )
                        )
        finally:
            self.train(was_training)
        return results[0] if single else results

    @torch.inference_mode()
    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        size: int | None = None,
        protocol: str = "single",
    ) -> torch.Tensor | list[torch.Tensor]:
        """Dense per-pixel embeddings, D x H/2 x W/2 per image (normalised over D).

        A batch tensor B x 3 x H x W (uint8 or [0, 1] float) gives B x D x H/2 x W/2.
        """
        from lseg.inference import resolve_protocol, run_protocol

        spec, size = resolve_protocol(protocol, size)
        was_training = self.training
        self.eval()
        try:
            if isinstance(images, torch.Tensor) and images.ndim == 4:
                batches = [self.normalize(images)]
            else:
                items = [images] if not isinstance(images, (list, tuple)) else images
                batches = [self.preprocess(item, size) for item in items]
            outputs = []
            for pixel_values in batches:
                feature_size = ((pixel_values.shape[-2] + 1) // 2, (pixel_values.shape[-1] + 1) // 2)
                features = run_protocol(
                    self.pixel_embeddings,
                    pixel_values,
                    spec,
                    out_size=feature_size,
                    amp=self.device.type == "cuda",
                )
                outputs.append(F.normalize(features.float(), dim=1))
        finally:
            self.train(was_training)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return outputs[0]
        squeezed = [o[0] for o in outputs]
        return squeezed[0] if not isinstance(images, (list, tuple)) else squeezed


def _same_size_runs(originals: list[np.ndarray], inputs: list[torch.Tensor]) -> list[list[int]]:
    """Indices of consecutive images whose original and model-input sizes match (one batch each)."""
    keys = [(o.shape[:2], tuple(t.shape[-2:])) for o, t in zip(originals, inputs)]
    runs = groupby(range(len(keys)), key=keys.__getitem__)
    return [list(indices) for _, indices in runs]
