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
from collections.abc import Iterator
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
from lseg.evaluate.metrics import seen_unseen_scores  # noqa: E402
from lseg.evaluate.runner import EvaluationSettings, embed_labels, mask_logits  # noqa: E402
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


def drive_scores(
    model: LSeg, split: str, sequences: list[str] | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(31 x H x W logits, 31 x H x W CAMs, H x W mask) of each image, at the label resolution, from
    one pass of the model and of the frozen ImageNet backbone at long side SIZE."""
    dataset = load_dataset("folder", DATA, split, sequences)
    space = build_label_space(dataset.class_names, synonyms=FOLDS)
    protocol, size = EvaluationSettings(size=SIZE).resolved_protocol()
    network, rows = imagenet_classifier()
    with torch.no_grad():
        text = embed_labels(model, space.labels)
        prototypes = F.normalize(
            model.text_encoder.encode(space.labels).float(), dim=-1
        ) @ word_to_classifier(model, rows)

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            cams = torch.einsum("bchw,nc->bnhw", network.forward_features(pixels.float()), prototypes)
            cams = F.interpolate(cams, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            return torch.cat([model(pixels, text).logits.float(), cams], 1)

        for index in range(len(dataset)):
            sample = dataset[index]
            (both,) = mask_logits(
                forward, [sample], model.processor, protocol, size, device=torch.device("cpu")
            )
            yield both[: len(text)], both[len(text) :], sample["mask"]


def score_grid(model: LSeg, fold: int, grid: list[tuple], split: str, sequences: list[str] | None) -> dict:
    """Seen / unseen mIoU and hIoU for each (bias, alpha, mode) of `grid`."""
    names, unseen = fold_classes(fold)
    count = len(names)
    is_unseen = torch.zeros(count, 1, 1)
    is_unseen[list(unseen.unseen)] = 1
    seen = 1 - is_unseen
    confusion = {key: torch.zeros(count * count, dtype=torch.long) for key in grid}
    for logits, cams, mask in drive_scores(model, split, sequences):
        valid = mask < count
        target = mask[valid] * count
        for bias, alpha, mode in grid:
            prior = cams if mode == "all" else cams * is_unseen
            predicted = (logits - bias * seen + alpha * prior).argmax(0)[valid]
            confusion[(bias, alpha, mode)] += torch.bincount(target + predicted, minlength=count * count)
    scores = {}
    for key, matrix in confusion.items():
        matrix = matrix.reshape(count, count).double()
        hits = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - hits
        iou = torch.where(union > 0, hits / union.clamp_min(1), torch.nan)
        scores[key] = {
            **seen_unseen_scores(iou.tolist(), unseen.unseen, unseen.apart),
            "per_class_iou": iou.tolist(),
        }
    return scores


def main() -> int:
    runs, suffix, models = fold_models(__doc__.splitlines()[0])
    results = []
    grid = [(b, a, m) for b in GRID_BIASES for a in ALPHAS for m in MODES if a > 0 or m == "all"]
    for fold, model in models:
        names, _ = fold_classes(fold)
        heldout = score_grid(model, fold, grid, "train", [HELDOUT_DRIVE])
        best = max(grid, key=lambda key: (heldout[key]["hiou"], -key[1], -key[0]))
        constant = max((k for k in grid if k[1] == 0), key=lambda key: (heldout[key]["hiou"], -key[0]))
        val = score_grid(model, fold, sorted({best, constant}), "val", None)
        results.append(chosen_against_constant(fold, best, constant, heldout, val))
        results[-1]["heldout_grid"] = {" ".join(map(str, key)): heldout[key]["hiou"] for key in grid}
        results[-1]["class_names"] = names
        brief = {k: v for k, v in val[best].items() if k != "per_class_iou"}
        print(json.dumps({"fold": fold, "chosen": best, "constant": constant, "val": brief}), file=sys.stderr)
    (runs / f"camvid32{suffix}_imagenet_prior.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
