"""LSeg: a frozen text encoder embeds labels, a DPT image encoder embeds pixels; logits are their
scaled cosine similarities, so one model segments with whatever labels it is given."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import CommitInfo
from torch import nn

from lseg.device import resolve_device
from lseg.errors import LSegError
from lseg.images import ImageInput
from lseg.model.card import save_card
from lseg.model.checkpoint import read_checkpoint, save_model
from lseg.model.config import LSegConfig, load_preset
from lseg.model.dpt import DPTDecoder
from lseg.model.head import LSegHead, TextProjection, upsample_logits
from lseg.model.hub import push_folder
from lseg.model.image_encoder import build_image_encoder
from lseg.model.text_encoder import build_text_encoder
from lseg.model.weights import empty_model, load_state
from lseg.precision import parse_dtype
from lseg.processing import LSegImageProcessor, SegmentationResult, pad_image, padded_size


@dataclass
class LSegOutput:
    """What `LSeg.forward` returns (tensors only, like Hugging Face model outputs).

    `logits` are `pixel_embeds` . `label_embeds` x logit scale, upsampled bilinearly (align_corners=True)
    from the stride-2 grid to the input size, so upsampling `pixel_embeds` the same way and taking
    the argmax over labels gives the same labels. Exception: a config with a `regularizer` smooths
    the logits spatially after the dot product, which the embeddings do not show.
    """

    logits: torch.Tensor  # B x N x H x W
    pixel_embeds: torch.Tensor  # B x D x ceil(H/2) x ceil(W/2), L2-normalised over D
    label_embeds: torch.Tensor  # N x D, L2-normalised


if hasattr(torch.export, "register_dataclass"):  # torch.export / ONNX (dynamo) see through the output
    torch.export.register_dataclass(LSegOutput, serialized_type_name="lseg.LSegOutput")


class LSeg(nn.Module):
    """Language-driven semantic segmentation model (Li et al., ICLR 2022).

    `forward(pixel_values, label_embeds) -> LSegOutput` is tensors only (compile- and export-friendly):
    normalised B x 3 x H x W images of any size (`model.processor` makes them) and N x D label
    embeddings (`encode_text`). `segment`, `encode_image` and `encode_text` are the user-facing API.
    """

    def __init__(self, config: LSegConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.processor = LSegImageProcessor.from_config(config)
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
        self.text_projection = TextProjection(self.text_encoder.embed_dim) if config.text_projection else None
        # Black in the model's input space: the stride padding inside `pixel_embeddings`.
        self.register_buffer("pad_value", self.processor.pad_value(), persistent=False)
        # Set by `lseg.precision.prepare_for_inference` / `compile_for_inference`.
        self.inference_dtype: torch.dtype | None = None
        self.input_multiple = self.image_encoder.pad_multiple
        self._compiled_embed = None

    # ----------------------------------------------------------------- construction and weights
    @classmethod
    def from_config(cls, config: str | dict[str, Any] | LSegConfig, pretrained: bool = True) -> LSeg:
        """Build from a preset name ("tiny", "vit_b16", "vit_l16", ...), a dict or an LSegConfig.

        `pretrained=False` builds random weights without any download (tests, benchmarks). The model
        is returned in eval mode, ready for inference as with `from_pretrained`; `.train()` before
        fine-tuning (Lightning does so itself).
        """
        if isinstance(config, str):
            config = load_preset(config)
        elif isinstance(config, dict):
            config = LSegConfig.from_dict(config)
        return cls(config, load_pretrained=pretrained).eval()

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
        (auto, cpu, cuda, cuda:N), its floating weights cast to `dtype` (float32, bfloat16 or float16, a
        name or torch dtype, as `lseg.precision.parse_dtype` reads it; None or "auto": as stored) tensor
        by tensor as they are read: the weights are never all in memory in float32.

        The model is returned in eval mode (as Hugging Face's `from_pretrained`): the tensor API then
        uses the decoder's running BatchNorm statistics instead of overwriting them with each batch's.
        """
        target, cast = resolve_device(device), parse_dtype(dtype)  # fail before reading any weights
        config, state, source = read_checkpoint(
            id_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            dtype=cast,
        )
        model = empty_model(lambda: cls(config, load_pretrained=False))
        if cast is not None:
            model.to(cast)  # parameters on the meta device: free; `load_state` casts what it puts in
        return load_state(model, state, source).to(target).eval()

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
        if self.text_encoder.released:
            raise LSegError("cannot save a model whose text encoder was released (release_text_encoder)")
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
        return self.pad_value.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pad_value.dtype

    def encode_text(
        self, labels: str | Sequence[str], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """N x D label embeddings, L2-normalised (the frozen text encoder's are cached), in the space
        the pixel embeddings are matched in: through the config's `text_projection` if it has one.

        `labels` is a list of strings or one comma-separated string ("cat, dog"). Each label is asked
        through the config's `prompt_templates` (embeddings averaged), or through `templates` if given.
        """
        return self._projected(self.text_encoder.encode(labels, templates))

    def _projected(self, text: torch.Tensor) -> torch.Tensor:
        text = text.to(self.device, self.dtype)
        return text if self.text_projection is None else self.text_projection(text)

    def release_text_encoder(self, labels: str | Sequence[str]) -> torch.Tensor:
        """Embed `labels` (as `encode_text`) and free the text encoder's weights, in place.

        The model then segments with these labels (any subset, in any order) and no others (LSegError):
        for one-shot runs that know their labels, such as `lseg segment`, where the text tower's weights
        (CLIP ViT-B/32: 250 MB in float32) would otherwise sit beside the image passes. Saving the
        model afterwards is not possible; load it again for other labels.
        """
        return self._projected(self.text_encoder.release(labels))

    def pixel_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised B x D x ceil(H/2) x ceil(W/2) embeddings of normalised B x 3 x H x W images.

        The input is padded with black (for this model's mean/std) to the encoder's multiple and the
        stride-2 map cropped back to the input's extent; logits are upsampled from this cropped map
        too, so features and logits describe the same grid.
        """
        return self._on_stride2_grid(pixel_values, self._compiled_embed or self.embed_padded)

    def decoded_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The decoder's B x F x ceil(H/2) x ceil(W/2) map that `pixel_embeddings` projects (same
        padding and crop): training scores it with `classify_decoded`, never building embeddings."""
        return self._on_stride2_grid(pixel_values, lambda padded: self.decoder(self.image_encoder(padded)))

    def _on_stride2_grid(self, pixel_values: torch.Tensor, network: Callable) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        padded = pad_image(pixel_values, padded_size(height, width, self.input_multiple), self.pad_value)
        return network(padded)[..., : (height + 1) // 2, : (width + 1) // 2]

    def embed_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """Encoder -> decoder -> per-pixel embeddings of images already padded to `input_multiple`."""
        return self.head.embed(self.decoder(self.image_encoder(padded)))

    def compile_for_inference(self, bucket: int = 128, **options: Any) -> LSeg:
        """`torch.compile` the encoder, decoder and embedding (`embed_padded`), in place.

        Inputs are padded with black to multiples of `bucket` (and of the encoder's own multiple), so a
        folder of mixed sizes at one `--size` compiles a handful of shapes, not one per image:
        `padded_size` lists them. The extra black border changes a ViT's outputs slightly (attention
        sees it), as the encoder's own padding already does. `options` go to `torch.compile`.
        """
        import math

        if bucket < 1:
            raise LSegError(f"bucket must be at least 1, got {bucket}")
        self.input_multiple = math.lcm(bucket, self.image_encoder.pad_multiple)
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        self._compiled_embed = torch.compile(self.embed_padded, dynamic=False, **options)
        return self

    def classify(
        self, pixel_embeds: torch.Tensor, label_embeds: torch.Tensor, size: Sequence[int]
    ) -> torch.Tensor:
        """B x N x H x W logits at `size` (the input's) of `pixel_embeddings` against N x D labels."""
        return upsample_logits(self.head(pixel_embeds, label_embeds), size)

    def classify_decoded(
        self, decoded: torch.Tensor, label_embeds: torch.Tensor, size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`classify` of `decoded_features` (the same logits, without the embedding map) and the
        stride-2 cosines they came from."""
        cosines = self.head.cosines(decoded, label_embeds)
        return upsample_logits(self.head.logits(cosines), size), cosines

    def forward(self, pixel_values: torch.Tensor, label_embeds: torch.Tensor) -> LSegOutput:
        """Logits and embeddings of normalised B x 3 x H x W images against N x D label embeddings."""
        if not isinstance(label_embeds, torch.Tensor):
            raise LSegError(
                "LSeg.forward takes N x D label embeddings: use "
                "model(pixel_values, model.encode_text(labels)) or model.segment(images, labels)"
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise LSegError(f"pixel_values must be B x 3 x H x W, got {tuple(pixel_values.shape)}")
        pixels = self.pixel_embeddings(pixel_values)
        logits = self.classify(pixels, label_embeds, pixel_values.shape[-2:])
        return LSegOutput(logits, pixels, F.normalize(label_embeds.to(pixels.dtype), dim=-1))

    # ----------------------------------------------------------------- user-facing API
    def segment(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str] | None = None,
        size: int | None = None,
        protocol: str = "single",
        batch_size: int = 1,
        *,
        dtype: str | torch.dtype | None = None,
        return_scores: bool = False,
        return_confidence: bool = False,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image (or a list) with label words (a list or "cat, dog"; default: the config's);
        results at original resolution. A convenience over `lseg.predictor.LSegPredictor`, which
        also gives features from the same pass.

        `size` is the long side the model sees (at scale 1 for multi-scale protocols); `protocol` is
        single, slide, lseg-ms or openscene (`lseg.inference`); up to `batch_size` consecutive
        same-size images share a forward pass. `dtype`: the forward's precision ("auto": bf16
        autocast on CUDA, float32 on CPU; `lseg.precision`). The label map takes bounded memory;
        `return_scores` adds N x H x W probabilities (7.2 GB for 150 labels on a 12 MP photo),
        `return_confidence` the H x W probability of the chosen label.
        """
        from lseg.predictor import LSegPredictor

        extra = {"scores": return_scores, "confidence": return_confidence}
        outputs = {"label_map", *(name for name, asked in extra.items() if asked)}
        return LSegPredictor(self, protocol, size, dtype).predict(
            images, labels, outputs, batch_size=batch_size
        )

    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        size: int | None = None,
        protocol: str = "single",
        *,
        dtype: str | torch.dtype | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Dense per-pixel embeddings, D x ceil(H/2) x ceil(W/2) per image (normalised over D), where
        H x W is the size the model sees: the stride-2 grid of the logits `segment` takes the argmax of.

        A batch tensor B x 3 x H x W (uint8 or [0, 1] float) gives B x D x ceil(H/2) x ceil(W/2).
        `dtype`: the forward's precision, as for `segment`; float32 results (`LSegPredictor`).
        """
        from lseg.predictor import LSegPredictor

        results = LSegPredictor(self, protocol, size, dtype).predict(images, outputs={"features"})
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return torch.stack([result.features for result in results])
        return [r.features for r in results] if isinstance(results, list) else results.features
