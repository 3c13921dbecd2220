import pytest
import torch

from lseg.errors import LSegError
from lseg.inference import (
    PROTOCOLS,
    InferenceProtocol,
    get_protocol,
    plan_protocol,
    run_protocol,
    window_starts,
)
from lseg.processing import LSegImageProcessor, pad_image


def predict_whole(forward, images):
    """One whole-image pass through `run_protocol` (the single protocol)."""
    return run_protocol(forward, images, get_protocol("single"), pad_value=0.0)


def predict_sliding(forward, images, crop_size, stride, *, pad_value, window_batch_size=8):
    """Sliding windows through `run_protocol` at scale 1 (no resize)."""
    protocol = InferenceProtocol("windows", crop_size=crop_size, stride=stride)
    return run_protocol(forward, images, protocol, pad_value=pad_value, window_batch_size=window_batch_size)


def pixelwise_model(channels: int = 4) -> torch.nn.Module:
    """A 1x1 conv: translation- and flip-equivariant, so windows and flips must not change its output."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, channels, kernel_size=1).eval()


class ConstantForward:
    """Returns ones and records every batch it sees (count windows, check batch bounds)."""

    def __init__(self, channels: int = 2, downsample: int = 1) -> None:
        self.channels = channels
        self.downsample = downsample
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        h, w = x.shape[-2] // self.downsample, x.shape[-1] // self.downsample
        return torch.ones(x.shape[0], self.channels, h, w)

    @property
    def images_seen(self) -> int:
        return sum(s[0] for s in self.shapes)


def test_one_window_covering_the_image_equals_whole_pass():
    model = pixelwise_model()
    images = torch.randn(1, 3, 40, 50)
    whole = predict_whole(model, images)
    sliding = predict_sliding(model, images, crop_size=64, stride=32, pad_value=-1.0)
    assert sliding.shape == (1, 4, 40, 50)
    torch.testing.assert_close(sliding, whole)


def test_overlapping_windows_average_to_the_whole_pass():
    model = pixelwise_model()
    images = torch.randn(2, 3, 70, 90)
    sliding = predict_sliding(model, images, crop_size=32, stride=20, pad_value=0.0, window_batch_size=3)
    torch.testing.assert_close(sliding, predict_whole(model, images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(20, 30), (50, 75)])
def test_padding_never_leaks_into_the_output(size):
    images = torch.randn(1, 3, *size)
    out = predict_sliding(lambda x: x, images, crop_size=32, stride=24, pad_value=-7.0)
    torch.testing.assert_close(out, images)


def test_flip_averaging_is_a_no_op_for_a_flip_equivariant_model():
    model = pixelwise_model()
    images = torch.randn(1, 3, 45, 61)
    plain = InferenceProtocol("t", base_size=64, crop_size=32, stride=20, scales=(0.75, 1.0))
    flipped = InferenceProtocol("t", base_size=64, crop_size=32, stride=20, scales=(0.75, 1.0), flip=True)
    out_plain = run_protocol(model, images, plain, pad_value=0.0)
    out_flipped = run_protocol(model, images, flipped, pad_value=0.0)
    torch.testing.assert_close(out_flipped, out_plain, rtol=1e-5, atol=1e-5)


# Expected lseg-ms plans, by hand: long side ceil(520 * s) = 260, 390, 520, 650, 780, 910; the short
# side keeps the aspect ratio (rounded half up); sides below 480 are padded to 480; windows per side
# = ceil((side - 480) / 320) + 1.
LSEG_MS_360x480 = [  # short = 0.75 * long
    ((195, 260), (480, 480), (1, 1)),
    ((293, 390), (480, 480), (1, 1)),  # 292.5 rounds up
    ((390, 520), (480, 520), (1, 2)),
    ((488, 650), (488, 650), (2, 2)),  # 487.5 rounds up; ceil(8/320)+1 = 2 rows
    ((585, 780), (585, 780), (2, 2)),
    ((683, 910), (683, 910), (2, 3)),  # ceil(430/320)+1 = 3 columns
]
LSEG_MS_1024x2048 = [  # short = 0.5 * long
    ((130, 260), (480, 480), (1, 1)),
    ((195, 390), (480, 480), (1, 1)),
    ((260, 520), (480, 520), (1, 2)),
    ((325, 650), (480, 650), (1, 2)),
    ((390, 780), (480, 780), (1, 2)),
    ((455, 910), (480, 910), (1, 3)),
]


@pytest.mark.parametrize(
    ("height", "width", "expected", "windows"),
    [(360, 480, LSEG_MS_360x480, 18), (1024, 2048, LSEG_MS_1024x2048, 11)],
)
def test_lseg_ms_visits_expected_scales_and_windows(height, width, expected, windows):
    protocol = get_protocol("lseg-ms")
    plan = plan_protocol(protocol, height, width)
    assert [p.scale for p in plan] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert [(p.size, p.padded_size, p.grid) for p in plan] == expected
    assert sum(p.windows for p in plan) == windows

    forward = ConstantForward()
    out = run_protocol(
        forward, torch.zeros(1, 3, height, width), protocol, pad_value=0.0, window_batch_size=4
    )
    assert out.shape == (1, 2, height, width)
    assert forward.images_seen == 2 * windows  # every window also flipped
    assert all(s[-2:] == (480, 480) and s[0] <= 4 for s in forward.shapes)
    # Count-map averaging makes each pass contribute exactly 1; the 6 scales x 2 flips are averaged.
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_output_has_original_size_even_for_low_resolution_forward(name):
    forward = ConstantForward(channels=5, downsample=2)  # dense features at H/2
    images = torch.zeros(2, 3, 37, 53)
    protocol = get_protocol(name, base_size=96) if name != "single" else get_protocol(name)
    out = run_protocol(forward, images, protocol, pad_value=0.0)
    assert out.shape == (2, 5, 37, 53)
    torch.testing.assert_close(out, torch.ones_like(out))  # the mean of the passes, never their sum
    assert run_protocol(forward, images, protocol, out_size=(10, 12), pad_value=0.0).shape == (2, 5, 10, 12)


def test_single_protocol_resizes_long_side():
    forward = ConstantForward()
    run_protocol(forward, torch.zeros(1, 3, 30, 60), get_protocol("single", base_size=40), pad_value=0.0)
    assert forward.shapes == [(1, 3, 20, 40)]


def test_presets_match_the_papers():
    ms = get_protocol("lseg-ms")
    assert (ms.base_size, ms.crop_size, ms.stride, ms.flip) == (520, 480, 320, True)
    assert ms.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    openscene = get_protocol("openscene")
    assert (openscene.base_size, openscene.crop_size, openscene.scales, openscene.flip) == (
        640,
        640,
        (1.0,),
        True,
    )
    slide = get_protocol("slide")
    assert (slide.crop_size, slide.stride, slide.scales, slide.flip) == (480, 320, (1.0,), False)


def test_unknown_protocol_lists_valid_names():
    with pytest.raises(LSegError, match="single, slide, lseg-ms, openscene"):
        get_protocol("multiscale")


@pytest.mark.parametrize(
    "kwargs", [{"scales": ()}, {"crop_size": 480}, {"crop_size": 100, "stride": 200}, {"base_size": 0}]
)
def test_invalid_protocols_are_user_errors(kwargs):
    with pytest.raises(LSegError):
        InferenceProtocol("bad", **kwargs)


def test_resolve_protocol_size_semantics():
    from lseg.inference import resolve_protocol

    single, resize = resolve_protocol("single", 240)
    assert resize == 240 and single.base_size is None
    multi, resize = resolve_protocol("lseg-ms", 240)
    assert resize is None and multi.base_size == 240 and multi.crop_size == 480
    openscene, _ = resolve_protocol("openscene", 320)
    assert (openscene.base_size, openscene.crop_size, openscene.stride) == (320, 320, 213)
    slide, _ = resolve_protocol("slide", None, crop_size=240)
    assert (slide.crop_size, slide.stride) == (240, 160)
    with pytest.raises(LSegError, match="no sliding window"):
        resolve_protocol("single", None, crop_size=240)


# --------------------------------------------------------------------------- padding and windows
IMAGENET = LSegImageProcessor((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class PaddedMeanFilter:
    """Not pointwise, like LSeg: pads its input with black to a multiple of 16, applies a 3x3 mean
    filter per channel (replicate border, so only the padding shows at the edges) and crops back."""

    def __init__(self, black: torch.Tensor, multiple: int = 16) -> None:
        self.black, self.multiple = black, multiple

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        size = (-(-height // self.multiple) * self.multiple, -(-width // self.multiple) * self.multiple)
        padded = torch.nn.functional.pad(pad_image(x, size, self.black), (1, 1, 1, 1), mode="replicate")
        kernel = torch.full((3, 1, 3, 3), 1 / 9)
        return torch.nn.functional.conv2d(padded, kernel, groups=3)[..., :height, :width]


def test_slide_with_a_crop_covering_the_image_equals_the_whole_pass_for_imagenet_statistics():
    black = IMAGENET.pad_value()
    model = PaddedMeanFilter(black)
    images = torch.randn(2, 3, 20, 27)
    whole = run_protocol(model, images, get_protocol("single"), pad_value=black)
    sliding = predict_sliding(model, images, crop_size=32, stride=20, pad_value=black)
    torch.testing.assert_close(sliding, whole)


@pytest.mark.parametrize("name", ["slide", "lseg-ms", "openscene"])
def test_padding_never_leaks_a_non_black_border(name):
    """A black image padded by any protocol and filtered stays exactly the filtered black."""
    black = IMAGENET.pad_value()
    model = PaddedMeanFilter(black)
    images = black.expand(1, 3, 45, 70).clone()
    protocol = get_protocol(name, base_size=60, crop_size=48, stride=32)
    out = run_protocol(model, images, protocol, pad_value=black)
    torch.testing.assert_close(out, images)


@pytest.mark.parametrize(
    ("length", "crop", "stride"),
    [(100, 32, 20), (480, 480, 320), (481, 480, 320), (1000, 480, 320), (97, 32, 32)],
)
def test_windows_stay_inside_images_at_least_the_crop(length, crop, stride):
    starts = window_starts(length, crop, stride)
    assert len(starts) == max(length - crop + stride - 1, 0) // stride + 1  # mmseg's slide_inference
    assert starts[0] == 0 and starts[-1] == length - crop  # the last window ends at the edge
    assert all(0 <= s <= length - crop for s in starts) and starts == sorted(starts)
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # every pixel covered


def test_windows_of_an_image_at_least_the_crop_see_no_padding():
    seen = []

    def forward(x):
        seen.append(x.min().item())
        return x

    images = torch.ones(1, 3, 70, 90)
    predict_sliding(forward, images, crop_size=32, stride=24, pad_value=-100.0, window_batch_size=1)
    assert len(seen) == 3 * 4 and min(seen) == 1.0
