import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from augment import ImageSpec, blur_kernel_size, save_preview
from conftest import simclr_transform

# the same for every channel, so R=G=B survives normalisation
GRAY = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
PLAIN = dict(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0, jitter_p=0, gray_p=0, blur_p=0, **GRAY)


@pytest.fixture(autouse=True)
def seeded():
    """SimCLRTransform draws from torch's global generator: the same draws in every run."""
    torch.manual_seed(0)


def image(size=32, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def unnorm(t):
    return t * 0.5 + 0.5


@pytest.mark.parametrize("as_tensor", [False, True])
def test_shapes_dtype_range_and_views_differ(as_tensor):
    img = image(40)
    if as_tensor:
        img = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # uint8 (3, H, W)
    t = simclr_transform(24, **GRAY)
    v1, v2_ = t(img)
    assert v1.shape == v2_.shape == (3, 24, 24) and v1.dtype == torch.float32
    # (x - 0.5) / 0.5 * 0.5 + 0.5 for x in [0, 1]: two roundings of values <= 1 (<= 1.2e-7) -> 1e-6
    assert unnorm(v1).min() >= -1e-6 and unnorm(v1).max() <= 1 + 1e-6
    assert not torch.equal(v1, v2_)


def test_no_augmentation_gives_the_image():
    img = image(16)
    v1, v2_ = simclr_transform(16, **PLAIN)(img)
    expected = v2.functional.to_dtype(v2.functional.to_image(img), torch.float32, scale=True)
    torch.testing.assert_close(unnorm(v1), expected)
    torch.testing.assert_close(v1, v2_)


def test_flip_p1_flips():
    img = image(16)
    v1, _ = simclr_transform(16, **{**PLAIN, "flip_p": 1.0})(img)
    plain, _ = simclr_transform(16, **PLAIN)(img)
    torch.testing.assert_close(v1, plain.flip(-1))


def test_grayscale_p1_gives_r_equal_g_equal_b():
    v1, _ = simclr_transform(16, **{**PLAIN, "gray_p": 1.0})(image(16))
    # one uint8 luma written to the three channels, normalised by the same mean and std: equal,
    # not close
    assert torch.equal(v1[0], v1[1]) and torch.equal(v1[1], v1[2])
    rgb, _ = simclr_transform(16, **PLAIN)(image(16))
    assert (rgb[0] - rgb[1]).abs().max() > 0.1


def test_jitter_p_and_strength_take_effect():
    img = image(16)
    plain, _ = simclr_transform(16, **PLAIN)(img)
    jittered, _ = simclr_transform(16, **{**PLAIN, "jitter_p": 1.0})(img)
    assert (jittered - plain).abs().mean() > 0.01
    none, _ = simclr_transform(16, **{**PLAIN, "jitter_p": 1.0, "s": 0.0})(img)
    torch.testing.assert_close(none, plain)


def test_crop_scale_takes_effect():
    img = image(32)
    plain, _ = simclr_transform(32, **PLAIN)(img)
    small, _ = simclr_transform(32, **{**PLAIN, "crop_scale": (0.1, 0.1)})(img)
    assert (small - plain).abs().mean() > 0.1
    # a 10% crop upscaled 10x in area is much smoother than the white-noise image
    assert small.diff(dim=-1).abs().mean() < 0.6 * plain.diff(dim=-1).abs().mean()


def test_blur_p1_smooths_and_default_blur_depends_on_size():
    img = image(64)
    plain, _ = simclr_transform(64, **PLAIN)(img)
    blurred, _ = simclr_transform(64, **{**PLAIN, "blur_p": 1.0, "blur_sigma": (2.0, 2.0)})(img)
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * plain.diff(dim=-1).abs().mean()
    assert blur_kernel_size(96) == 9 and blur_kernel_size(224) == 23 and blur_kernel_size(28) == 3
    has_blur = lambda t: any(isinstance(op, v2.RandomApply)
                             and isinstance(op.transforms[0], v2.GaussianBlur)
                             for op in t.transform.transforms)
    assert has_blur(simclr_transform(96)) and not has_blur(simclr_transform(32))
    assert has_blur(simclr_transform(32, blur_p=0.5))


def test_rotation_p1_rotates_by_a_multiple_of_90():
    img = image(16)
    plain, _ = simclr_transform(16, **PLAIN)(img)
    for seed in range(4):
        torch.manual_seed(seed)
        rot, _ = simclr_transform(16, **{**PLAIN, "rotate_p": 1.0})(img)
        dists = [(rot - torch.rot90(plain, k, dims=(1, 2))).abs().max().item() for k in (1, 2, 3)]
        # nearest-neighbour rotation copies pixels (0 here); a wrong pixel differs by a uint8
        # step, 2/255 = 8e-3
        assert min(dists) < 1e-5


def test_eval_transform_is_deterministic_and_sized():
    t = ImageSpec(24, **GRAY).transform()
    a, b = t(image(40)), t(image(40))
    assert a.shape == (3, 24, 24) and torch.equal(a, b)


def test_preview_png(tmp_path):
    path = save_preview([image(20, s) for s in range(3)], simclr_transform(20),
                        tmp_path / "aug.png")
    w, h = Image.open(path).size
    # 3 x 3 tiles (image, view 1, view 2) of 20 px x 5 >= 96 px, padding 2
    assert (w, h) == (3 * 102 + 2, 3 * 102 + 2)
