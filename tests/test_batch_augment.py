"""BatchAugment against torchvision's functional ops with the same parameters, and its random
distributions."""
import math

import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

import augment as A
from conftest import batch_augment, colour_op, resized_crop

GRAY = dict(mean=(0.5,) * 3, std=(0.5,) * 3)


def images(b=6, size=24, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def uint8_images(b, size, seed=0):
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def per_sample(fn, x, *params):
    return torch.stack([fn(x[i], *(p[i].item() for p in params)) for i in range(len(x))])


# float32 tolerances below are in units of ulp(1) = 2^-23 = 1.2e-7 (pixels in [0, 1]); a rounding is
# half of one ulp of its result. Brightness, contrast, saturation: f x + (1 - f) y as
# one 3x3 matmul + offset (ours) or as a blend (torchvision): <= 7 roundings of partial
# sums <= 1.8 each side (8e-7) plus the mean luma of contrast summed in another order
# (<= 10 roundings relative x (1 - f) <= 0.8: 5e-7) -> 2e-6. Hue: torchvision's RGB -> HSV -> RGB
# has ~10 ops on h in [0, 6) (ulp 4.8e-7) scaled back by chroma <= 1 -> 5e-6 -> 1e-5. (A luma weight
# off by 1e-4, 0.299 for 0.2989, moves saturation by up to 8e-5: these tolerances see it.)
@pytest.mark.parametrize("ours,theirs,lo,hi,tol", [
    (colour_op(0), TF.adjust_brightness, 0.2, 1.8, 2e-6),
    (colour_op(1), TF.adjust_contrast, 0.2, 1.8, 2e-6),
    (colour_op(2), TF.adjust_saturation, 0.2, 1.8, 2e-6),
    (A.adjust_hue, TF.adjust_hue, -0.5, 0.5, 1e-5),
])
def test_colour_ops_match_torchvision(ours, theirs, lo, hi, tol):
    x = images(8)
    f = lo + (hi - lo) * torch.rand(8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x, f), per_sample(theirs, x, f), atol=tol, rtol=0)


def test_hue_of_gray_and_one_channel_images_is_unchanged():
    g = images(2)[:, :1].expand(-1, 3, -1, -1).contiguous()
    torch.testing.assert_close(A.adjust_hue(g, torch.tensor([0.3, -0.2])), g)
    one = images(2)[:, :1]
    assert A.adjust_hue(one, torch.tensor([0.3, -0.2])) is one


def test_grayscale_matches_torchvision():
    x = images(4)
    # 3 products + 2 sums of values <= 1, in either order: <= 5 half-ulps(1) = 3e-7 each
    # side -> 1e-6
    torch.testing.assert_close(A.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("box", [(3, 5, 10, 12), (0, 0, 24, 24), (2, 1, 21, 17)])
@pytest.mark.parametrize("size", [16, 32])
def test_resized_crop_matches_torchvision(box, size):
    x = images(3)
    boxes = torch.tensor([box] * 3)
    ours = resized_crop(x, boxes, size)
    # torchvision antialiases when it shrinks; we sample bilinearly, so compare with antialias only
    # when enlarging
    antialias = box[2] <= size and box[3] <= size
    theirs = TF.resized_crop(x, *box, [size, size], antialias=antialias)
    # source coordinates <= 24 px computed by two formulas: a few ulp(24) = 1.9e-6 px apart, times a
    # neighbour difference <= 1, plus the 4-term bilinear blend (2.4e-7) -> ~6e-6 -> 1e-5 (half a
    # pixel off would be ~0.1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_flip_and_rotation_match_torchvision():
    x = images(4, size=20)
    full = torch.tensor([[0, 0, 20, 20]] * 4)
    flip = torch.tensor([True, False, True, False])
    out = resized_crop(x, full, 20, flip=flip)
    # exact copies in exact arithmetic; the [-1, 1] grid round trip leaves the coordinate a few
    # ulp(20) = 1.9e-6 px off the pixel centre, times a neighbour difference <= 1 -> ~6e-6 -> 1e-5
    torch.testing.assert_close(out[0], TF.horizontal_flip(x[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=1e-5, rtol=0)
    for k in range(4):
        rot = torch.full((4,), k)
        out = resized_crop(x, full, 20, rot=rot)
        theirs = TF.rotate(x, 90.0 * k)  # counter-clockwise, nearest: exact on a square image
        assert (out - theirs).abs().max().item() <= 1e-5, k


def test_blur_matches_torchvision():
    x = images(4, size=32)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    ours = A.gaussian_blur(x, sigma, 9)
    theirs = torch.stack([TF.gaussian_blur(x[i], [9, 9], [s.item(), s.item()])
                          for i, s in enumerate(sigma)])
    # two passes of 9 products summed (<= 17 half-ulps(1) = 1e-6 each side) with kernels normalised
    # by their own exp and sum (a few ulp relative: 3e-7 per pass) -> ~3e-6 -> 1e-5
    assert (ours - theirs).abs().max().item() <= 1e-5


def params_identity(aug, b, size, **over):
    p = aug.sample_params(b, size, size, torch.Generator().manual_seed(3))
    p.update(boxes=torch.tensor([[0, 0, size, size]] * b), flip=torch.zeros(b, dtype=torch.bool),
             gray=torch.zeros(b, dtype=torch.bool), sigma=torch.zeros(b))
    p.update(over)
    return p


def test_jitter_is_torchvisions_four_ops_in_each_samples_order():
    x = images(12)
    aug = batch_augment(24, jitter_p=1.0, gray_p=0, blur_p=0, flip_p=0, **GRAY)
    p = params_identity(aug, 12, 24)
    ours = aug.apply(x, p) * 0.5 + 0.5
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(12):
        y = x[i]
        for o in p["order"][i].tolist():
            y = ops[o](y, p["factors"][i, o].item())
        # each op's error as in test_colour_ops_match_torchvision (hue 5e-6, the others 1.3e-6),
        # grown by each later op by at most |f| + |1 - f| <= 2.6:
        # 5e-6 * 2.6^3 + 1.3e-6 * (1 + 2.6 + 2.6^2) = 1e-4
        assert (ours[i] - y).abs().max().item() <= 1e-4, i


def test_full_pipeline_matches_torchvision_composition():
    """crop + flip + jitter + grayscale + blur + normalise, sample by sample."""
    x = images(10, size=40)
    aug = batch_augment(32, jitter_p=0.8, gray_p=0.5, blur_p=0.5, **GRAY)
    p = aug.sample_params(10, 40, 40, torch.Generator().manual_seed(5))
    ours = aug.apply(x, p) * 0.5 + 0.5
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(10):
        t, l, h, w = p["boxes"][i].int().tolist()
        y = TF.resized_crop(x[i], t, l, h, w, [32, 32], antialias=False)
        y = TF.horizontal_flip(y) if p["flip"][i] else y
        if p["jitter"][i]:
            for o in p["order"][i].tolist():
                y = ops[o](y, p["factors"][i, o].item())
        y = TF.rgb_to_grayscale(y, 3) if p["gray"][i] else y
        s = p["sigma"][i].item()
        y = TF.gaussian_blur(y, [A.blur_kernel_size(32)] * 2, [s, s]) if s > 0 else y
        # the crop's 1e-5 grown by the jitter (2.6^3 = 18: 2e-4), plus the jitter's own 1e-4 and the
        # blur's 1e-5 -> 3e-4 -> 5e-4
        assert (ours[i] - y).abs().max().item() <= 5e-4, i


def test_uint8_and_float_inputs_agree_and_one_channel_is_repeated():
    x8 = uint8_images(5, 20)
    aug = batch_augment(16, **GRAY)
    p = aug.sample_params(5, 20, 20, torch.Generator().manual_seed(0))
    # the crop of x then / 255, or of x / 255: ~3 roundings apart = 1.5 ulp(1) = 1.8e-7, grown by
    # the three affine colour ops (|f| + |1 - f| <= 2.6 each: 18x; hue keeps the spread) and
    # by 1/std = 2: 6e-6 -> 1e-5
    torch.testing.assert_close(aug.apply(x8, p), aug.apply(x8.float() / 255, p), atol=1e-5, rtol=0)
    one = aug(x8[:, :1], torch.Generator().manual_seed(0))
    assert (one.shape == (10, 3, 16, 16) and torch.equal(one[:, 0], one[:, 1])
            and torch.equal(one[:, 1], one[:, 2]))


def test_chunked_cpu_path_equals_one_chunk():
    x = uint8_images(20, 28)
    aug = batch_augment(24, blur_p=0.5)
    p = aug.sample_params(20, 28, 28, torch.Generator().manual_seed(0))
    whole = aug.apply(x, p)
    aug.cpu_chunk_bytes = 4 * 3 * 24 * 24 * 3  # three samples per chunk
    # The same float32 ops on 3 samples or 20: the batched matmul and mean luma of each colour round
    # may take another vectorisation, 1 ulp(1) = 1.2e-7 apart per round. A difference from round t
    # grows by the later rounds (|f| + |1 - f| <= 2.6 each) and by 1/std <= 1/0.225 = 4.4 on
    # normalising (values reach |2.6|, ulp 2.4e-7):
    # 1.2e-7 * (1 + 2.6 + 2.6^2 + 2.6^3) * 4.4 = 1.5e-5 -> 2e-5 (about 80 ulp of the output).
    # Measured: up to 4.8e-6 over 200 random inputs on an Intel Xeon. A chunking bug (a parameter or
    # blur/hue subset of the wrong chunk) moves pixels by ~0.1.
    torch.testing.assert_close(aug.apply(x, p), whole, atol=2e-5, rtol=0)


def test_compiled_kernels_equal_eager():
    """Slow-ish (torch.compile of two small functions, a few seconds)."""
    x = uint8_images(16, 32)
    eager, comp = batch_augment(32, gray_p=0.3), batch_augment(32, gray_p=0.3, compile=True)
    p = eager.sample_params(16, 32, 32, torch.Generator().manual_seed(0))
    out = comp.apply(x, p)
    # fell back to eager: nothing was compared
    if comp.hue.compiled is None or comp.gray_and_normalize.compiled is None:
        pytest.skip("torch.compile is not available here")
    # the same elementwise IEEE ops fused, and inductor compiles with -ffp-contract=off (bitwise
    # equal here); allow hue's output 1 ulp(1) = 1.2e-7 (a reordered op), grown by the later colour
    # rounds (2.6^3 = 18x) and 1/std = 4.4 on normalising: 9e-6 -> 1e-5
    torch.testing.assert_close(out, eager.apply(x, p), atol=1e-5, rtol=0)


def test_views_differ_and_generator_makes_them_reproducible():
    x = uint8_images(8, 32)
    aug = batch_augment(32)
    v1 = aug(x, torch.Generator().manual_seed(0))
    assert not torch.equal(v1, aug(x, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(v1, aug(x, torch.Generator().manual_seed(0)))


def test_two_views_by_default_image_i_at_rows_i_and_b_plus_i():
    """Two views, as SimCLRTransform returns and loss.nt_xent takes them: view 1 of image i at row
    i, view 2 at row B + i, independent draws; views=1 gives one, views=3 three."""
    x = uint8_images(8, 32)
    plain = batch_augment(32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                          jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    two = plain(x, torch.Generator().manual_seed(0))
    assert two.shape == (16, 3, 32, 32)
    whole = plain.apply(x.float() / 255, params_identity(plain, 8, 32))  # each image itself
    # the same bilinear read of the same pixels from uint8 or from / 255: 1e-5 as above
    torch.testing.assert_close(two[:8], whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(two[8:], whole, atol=1e-5, rtol=0)
    aug = batch_augment(32)
    two = aug(x, torch.Generator().manual_seed(0))
    assert all(not torch.equal(two[i], two[8 + i]) for i in range(8))
    assert aug(x, torch.Generator().manual_seed(0), views=1).shape == (8, 3, 32, 32)
    assert aug(x, torch.Generator().manual_seed(0), views=3).shape == (24, 3, 32, 32)


# ------------------------------------------------------------------------------------ distributions

N = 20000


def within_3_sigma(frac, p, n=N):
    return abs(frac - p) <= 3 * math.sqrt(p * (1 - p) / n)


def test_crop_area_and_aspect_follow_torchvisions_sampler():
    aug = batch_augment(96)
    p = aug.sample_params(N, 96, 96, torch.Generator().manual_seed(0))
    top, left, h, w = p["boxes"].unbind(1)
    assert ((top >= 0).all() and (left >= 0).all() and (top + h <= 96).all()
            and (left + w <= 96).all())
    ours = (h * w / 96 ** 2)
    torch.manual_seed(0)
    ref = []
    for _ in range(4000):
        i, j, hh, ww = torchvision.transforms.RandomResizedCrop.get_params(
            torch.empty(3, 96, 96), (0.08, 1.0), (3 / 4, 4 / 3))
        ref.append(hh * ww / 96 ** 2)
    ref = torch.tensor(ref)
    se = math.sqrt(ours.var() / N + ref.var() / len(ref))
    assert abs(ours.mean() - ref.mean()) <= 3 * se, (ours.mean(), ref.mean())
    assert 0.45 < ours.mean() < 0.54  # E[scale] = 0.54, less the tries rejected for not fitting
    # w, h rounded to whole pixels: +-0.5 on sides >= 23 px moves it <= 0.5/31 + 0.5/23
    log_ratio = (w / h).log()
    assert log_ratio.min() >= math.log(3 / 4) - 0.05 and log_ratio.max() <= math.log(4 / 3) + 0.05


@pytest.mark.parametrize("key,p_attr,value", [("gray", "gray_p", 0.2), ("flip", "flip_p", 0.5),
                                              ("jitter", "jitter_p", 0.8)])
def test_fractions_near_their_probability(key, p_attr, value):
    aug = batch_augment(96, **{p_attr: value})
    p = aug.sample_params(N, 96, 96, torch.Generator().manual_seed(1))
    assert within_3_sigma(p[key].float().mean().item(), value)


def test_blur_fraction_sigma_range_and_factor_ranges():
    aug = batch_augment(96, s=1.0, rotate_p=0.3)
    p = aug.sample_params(N, 96, 96, torch.Generator().manual_seed(2))
    blurred = p["sigma"] > 0
    assert within_3_sigma(blurred.float().mean().item(), 0.5)
    assert p["sigma"][blurred].min() >= 0.1 and p["sigma"][blurred].max() <= 2.0
    # lo + (hi - lo) * u in float32: one rounding of a value <= 1.8 (1.2e-7) -> 1e-6
    assert p["factors"][:, :3].min() >= 0.2 - 1e-6 and p["factors"][:, :3].max() <= 1.8 + 1e-6
    assert p["factors"][:, 3].abs().max() <= 0.2 + 1e-6
    assert within_3_sigma((p["rot"] > 0).float().mean().item(), 0.3)
    assert set(p["rot"].unique().tolist()) == {0, 1, 2, 3}
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # a permutation per sample
    assert batch_augment(32).blur_p == 0 and batch_augment(96).blur_p == 0.5
