"""lseg: language-driven semantic segmentation (Li et al., ICLR 2022)."""

from lseg.errors import LSegError
from lseg.model import LSeg, LSegConfig, LSegOutput, SegmentationResult
from lseg.pipelines import pipeline
from lseg.processing import LSegImageProcessor
from lseg.version import __version__

__all__ = [
    "LSeg",
    "LSegConfig",
    "LSegError",
    "LSegImageProcessor",
    "LSegOutput",
    "SegmentationResult",
    "__version__",
    "pipeline",
]
