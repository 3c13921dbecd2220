import numpy as np
import pytest
import torch

from lseg import LSegError
from lseg.features import colormap, similarity_map


def unit_norms(array):
    return np.linalg.norm(np.asarray(array, dtype=np.float32), axis=0)


def test_similarity_is_one_where_features_equal_the_text_embedding():
    text = torch.nn.functional.normalize(torch.randn(16), dim=0)
    features = torch.nn.functional.normalize(torch.randn(16, 5, 7), dim=0)
    features[:, 1, 2] = text
    features[:, 4, 6] = 3 * text  # not unit length: still cosine 1
    similarity = similarity_map(features.numpy(), text.numpy())
    assert similarity.shape == (5, 7)
    assert similarity[1, 2] == pytest.approx(1, abs=1e-6) and similarity[4, 6] == pytest.approx(1, abs=1e-6)
    assert similarity.max() <= 1 + 1e-6
    with pytest.raises(LSegError, match="channels"):
        similarity_map(features.numpy(), np.ones(8))


def test_colormap_range():
    colours = colormap(np.array([[0.0, 0.5, 1.0]]))
    assert colours.shape == (1, 3, 3) and colours.dtype == np.uint8
    assert colours[0, 0].tolist() == [68, 1, 84] and colours[0, 2].tolist() == [253, 231, 37]


def test_heatmaps_are_resized_like_logits():
    """A heat map of the stride-2 grid goes to the image's size the way logits become label maps:
    the network's upsampling to the size the model saw, then the processor's resize."""
    from lseg.features import resize_map
    from lseg.model.head import upsample_logits
    from lseg.processing import LSegImageProcessor

    grid = torch.randn(4, 9, 13, generator=torch.Generator().manual_seed(0))
    model_size, image_size = (17, 25), (70, 101)
    heat = np.stack([resize_map(values.numpy(), image_size, model_size) for values in grid])
    label_map = LSegImageProcessor((0.5,) * 3, (0.5,) * 3).postprocess(
        upsample_logits(grid[None], model_size), [image_size]
    )[0]
    assert heat.shape == (4, *image_size)
    np.testing.assert_array_equal(heat.argmax(0), label_map.numpy())
