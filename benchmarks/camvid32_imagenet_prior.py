"""An ImageNet prior for the CamVid-32 folds' unseen classes, measured on trained fold models.

The frozen text encoder knows words, not pixels: MiniLM never saw an image. The backbone's ImageNet
classifier does know what 1,000 object classes look like, and many CamVid classes have ImageNet
relatives (traffic light, pole, street sign, minibus, mountain bike, worm fence). Here a ridge
regression, fitted on ImageNet's class names alone (no CamVid label), maps a word's text embedding to
a row of that classifier; the frozen ImageNet backbone's last feature map dotted with the row is the
word's class-activation map (CAM). The model's logits gain alpha x CAM (for every class or for the
unseen ones only) before the seen-class bias B is subtracted; B, alpha and the mode are chosen
together on the held-out drive by hIoU, as B alone is, and val is scored once. alpha = 0 is the
constant calibration.

    python benchmarks/camvid32_imagenet_prior.py --runs RUNS [--folds 0 1 2 3] [--variant NAME]

reads RUNS/camvid32_foldF[_NAME]/model (trained by benchmarks/camvid32_zeroshot.py) and writes
RUNS/camvid32[_NAME]_imagenet_prior.json.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo

sys.path.insert(0, str(Path(__file__).parent))
from camvid32_zeroshot import (  # noqa: E402
    BIASES,
    DATA,
    FOLDS,
    HELDOUT_DRIVE,
    SIZE,
    chosen_against_constant,
    fold_classes,
    fold_models,
)

from lseg import LSeg  # noqa: E402
from lseg.evaluate import build_label_space, load_dataset  # noqa: E402
from lseg.evaluate.metrics import SegmentationMetrics, seen_unseen_scores  # noqa: E402
from lseg.evaluate.runner import EvaluationSettings, embed_labels, mask_logits, seen_offsets  # noqa: E402
from lseg.files import write_json_atomic  # noqa: E402
from lseg.model.packaged_weights import packaged_state_dict  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"
RIDGE = 1.0  # the regression's L2 penalty (held-out ImageNet classes' retrieval is flat from 0.01 to 10)
ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
MODES = ("all", "unseen")
GRID_BIASES = tuple(b for b in BIASES if b <= 10)


def imagenet_classifier() -> tuple[torch.nn.Module, torch.Tensor]:
    """The frozen ImageNet backbone (packaged weights) and its 1000 x C classifier rows."""
    network = timm.create_model(BACKBONE, pretrained=False)
    network.load_state_dict(packaged_state_dict(BACKBONE))
    return network.eval(), network.get_classifier().weight.detach()


def word_to_classifier(model: LSeg, rows: torch.Tensor) -> torch.Tensor:
    """D x C ridge map from the model's text embeddings of ImageNet class names (each class the mean of
    its synonyms' embeddings, asked through the model's prompt templates) to the classifier rows."""
    info = ImageNetInfo()
    synonyms = [info.index_to_description(i).split(", ") for i in range(info.num_classes())]
    unique = list(dict.fromkeys(word.lower() for words in synonyms for word in words))
    embeds = F.normalize(model.text_encoder.encode(unique).float(), dim=-1)
    position = {word: i for i, word in enumerate(unique)}
    names = torch.stack([embeds[[position[w.lower()] for w in words]].mean(0) for words in synonyms])
    names = F.normalize(names, dim=-1)
    gram = names.T @ names + RIDGE * torch.eye(names.shape[1])
    return torch.linalg.solve(gram, names.T @ rows)


def word_cams(model: LSeg, labels: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """B x N x H x W CAMs of `labels` for normalised B x 3 x H x W images, from the frozen ImageNet
    backbone at stride 32, upsampled to the input; built once per model."""
    network, rows = imagenet_classifier()
    words = F.normalize(model.text_encoder.encode(labels).float(), dim=-1)
    prototypes = words @ word_to_classifier(model, rows)

    def cams(pixels: torch.Tensor) -> torch.Tensor:
        maps = torch.einsum("bchw,nc->bnhw", network.forward_features(pixels.float()), prototypes)
        return F.interpolate(maps, size=pixels.shape[-2:], mode="bilinear", align_corners=False)

    return cams


def drive_scores(
    model: LSeg, cams: Callable, split: str, sequences: list[str] | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(31 x H x W logits, 31 x H x W CAMs, H x W mask) of each image, at the label resolution, from
    one pass of the model and of `word_cams` at long side SIZE."""
    dataset = load_dataset("folder", DATA, split, sequences)
    protocol, size = EvaluationSettings(size=SIZE).resolved_protocol()
    text = embed_labels(model, labels(dataset.class_names))
    forward = lambda pixels: torch.cat([model(pixels, text).logits.float(), cams(pixels)], 1)  # noqa: E731
    for index in range(len(dataset)):
        sample = dataset[index]
        (both,) = mask_logits(forward, [sample], model.processor, protocol, size, device=torch.device("cpu"))
        yield both[: len(text)], both[len(text) :], sample["mask"]


def labels(class_names: list[str]) -> list[str]:
    """The folds file's word of each class, one per class (logit channel c is class c)."""
    return build_label_space(class_names, synonyms=FOLDS).labels


def score_grid(
    model: LSeg, cams: Callable, fold: int, grid: list[tuple], split: str, sequences: list[str] | None
) -> dict:
    """Seen / unseen mIoU, hIoU and per-class IoU for each (bias, alpha, mode) of `grid`."""
    names, unseen = fold_classes(fold)
    seen = seen_offsets(unseen, 1.0, torch.zeros(len(names), 1, 1))  # 1 for a seen class, 0 unseen
    metrics = {key: SegmentationMetrics(len(names)) for key in grid}
    with torch.no_grad():
        for logits, maps, mask in drive_scores(model, cams, split, sequences):
            for (bias, alpha, mode), metric in metrics.items():
                prior = maps if mode == "all" else maps * (1 - seen)
                metric.update((logits - bias * seen + alpha * prior).argmax(0)[None], mask[None])
    scores = {}
    for key, metric in metrics.items():
        iou = metric.compute()["per_class_iou"]
        scores[key] = {**seen_unseen_scores(iou, unseen.unseen, unseen.apart), "per_class_iou": iou}
    return scores


def main() -> int:
    runs, suffix, models = fold_models(__doc__.splitlines()[0])
    results = []
    grid = [(b, a, m) for b in GRID_BIASES for a in ALPHAS for m in MODES if a > 0 or m == "all"]
    for fold, model in models:
        names, _ = fold_classes(fold)
        with torch.no_grad():
            cams = word_cams(model, labels(names))
        heldout = score_grid(model, cams, fold, grid, "train", [HELDOUT_DRIVE])
        best = max(grid, key=lambda key: (heldout[key]["hiou"], -key[1], -key[0]))
        constant = max((k for k in grid if k[1] == 0), key=lambda key: (heldout[key]["hiou"], -key[0]))
        val = score_grid(model, cams, fold, sorted({best, constant}), "val", None)
        results.append(chosen_against_constant(fold, best, constant, heldout, val))
        results[-1]["heldout_grid"] = {" ".join(map(str, key)): heldout[key]["hiou"] for key in grid}
        results[-1]["class_names"] = names
        brief = {k: v for k, v in val[best].items() if k != "per_class_iou"}
        print(json.dumps({"fold": fold, "chosen": best, "constant": constant, "val": brief}), file=sys.stderr)
        write_json_atomic(runs / f"camvid32{suffix}_imagenet_prior.json", results)  # the folds so far
    return 0


if __name__ == "__main__":
    sys.exit(main())
