"""The dataset and benchmark registries: one record per name, read by every place that lists them."""

import re

import numpy as np
import pytest
from PIL import Image

from lseg.cli.main import main
from lseg.data import CAMVID_CLASSES, DATASETS, build_dataset, register_dataset
from lseg.evaluate.labels import taxonomy_column
from lseg.evaluate.zeroshot import BENCHMARKS, benchmark_record
from tests.conftest import REPO_ROOT


@pytest.fixture
def my_streets(tmp_path):
    """docs/architecture.md's worked example, executed as written, and a tiny folder in its layout."""
    text = (REPO_ROOT / "docs" / "architecture.md").read_text()
    example = re.search(r"<!-- example:register-dataset -->\n```python\n(.*?)```", text, re.S).group(1)
    try:
        exec(compile(example, "docs/architecture.md", "exec"), {})
        root = tmp_path / "streets"
        for index in range(3):
            for kind in ("images", "masks"):
                (root / "val" / kind).mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(index)
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
                root / "val" / "images" / f"{index}.png"
            )
            Image.fromarray(rng.integers(0, 11, (24, 32), dtype=np.uint8)).save(
                root / "val" / "masks" / f"{index}.png"
            )
        (root / "classes.txt").write_text("\n".join(CAMVID_CLASSES) + "\n")
        yield root
    finally:
        DATASETS.pop("my-streets", None)


def test_the_documented_dataset_is_built_evaluated_and_has_a_universal_label_space(my_streets, tmp_path):
    dataset = build_dataset("my-streets", my_streets, "val")
    assert len(dataset) == 3 and dataset.class_names == list(CAMVID_CLASSES)
    assert taxonomy_column("my-streets") == ("camvid-11", None)
    out = tmp_path / "report"
    code = main(["evaluate", "--preset", "tiny", "--dataset", "my-streets", "--data-root", str(my_streets),
                 "--out", str(out), "--size", "32", "--device", "cpu"])  # fmt: skip
    assert code == 0 and (out / "metrics.json").is_file()


def test_a_missing_root_names_the_registered_layout(my_streets, tmp_path):
    from lseg.errors import LSegError

    with pytest.raises(LSegError, match=r"my-streets root .* not found; expected layout: ROOT/\{train,val\}"):
        build_dataset("my-streets", tmp_path / "nowhere", "val")


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("camvid", layout="x")(lambda root, split, transform=None: None)


def test_the_evaluate_command_lists_every_registered_dataset_and_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in [*DATASETS, *(record.display for record in BENCHMARKS.values())]:
        assert name in help_text, name
    assert benchmark_record("PASCAL5i").name == "pascal" and benchmark_record("fss-1000").folds == 1
