"""Evaluation: `evaluate` (segmentation datasets) and `evaluate_zeroshot` (zero-shot benchmark folds).

Submodules: `labels` (words asked, label spaces), `metrics` (confusion-matrix metrics), `runner` (the
dataset loop), `zeroshot` (episodes and their scoring), `report` (metrics.json, charts, tables).
"""

from lseg.distributed import distributed_device, is_main_process
from lseg.evaluate.api import default_split, evaluate, evaluate_zeroshot, load_dataset
from lseg.evaluate.labels import LabelSpace, build_label_space
from lseg.evaluate.runner import EvaluationReport
from lseg.evaluate.zeroshot import ZeroShotReport

__all__ = [
    "EvaluationReport",
    "LabelSpace",
    "ZeroShotReport",
    "build_label_space",
    "default_split",
    "distributed_device",
    "evaluate",
    "evaluate_zeroshot",
    "is_main_process",
    "load_dataset",
]
