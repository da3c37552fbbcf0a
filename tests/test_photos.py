"""Folder images in the batched pipeline, on a real photograph (matplotlib's sample grace_hopper.jpg
cut to several aspect ratios): crop boxes drawn as torchvision draws them on the original, views
read from the stored square, the memory check, a legible preview, and train.py then eval_linear.py
on a folder of photos."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import augment as A
import data
import train
from conftest import batch_augment, one_line_exit_2, simclr_transform

# crop only
PLAIN = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, mean=(0.0,) * 3, std=(1.0,) * 3)


def photo():
    """Grace Hopper's portrait, matplotlib's sample photograph: a 512 x 600 (W x H) JPEG, as an RGB
    image."""
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        return img.convert("RGB")


def variant(img, height, width, lower, flip):
    """A real-photo image of exactly height x width: the largest crop of that aspect in the upper
    (or lower) two thirds of the portrait, resized, mirrored if flip."""
    region = img.height * 2 // 3
    ch = min(region, img.width * height // width)
    cw = ch * width // height
    top, left = (img.height - region if lower else 0), (img.width - cw) // 2
    out = img.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
    return ImageOps.mirror(out) if flip else out


def write_photos(root, shapes, classes=("face", "uniform"), splits=("train",)):
    """DIR/split/class/i.jpg or .png, image i of each class of height x width shapes[i]: JPEG and
    PNG in turn."""
    img = photo()
    for split in splits:
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i, (h, w) in enumerate(shapes):
                out = variant(img, h, w, lower=c == 1, flip=(i + (split == "test")) % 2 == 1)
                out.save(os.path.join(root, split, name, f"{i}.{'png' if i % 2 else 'jpg'}"))
    return str(root)


def originals(ds):
    """Each image of a folder dataset as decoded from its file, uint8 (3, H, W), in the dataset's
    order."""
    return [TF.pil_to_tensor(data._load_or_neighbour(ds.files, i)[0]) for i in range(len(ds))]


# -------------------------------------------------------------------------------- the stored images

def test_folder_images_are_stored_whole_with_their_sizes(tmp_path):
    shapes = [(120, 160), (160, 120), (108, 192), (200, 100)]  # 4:3, 3:4, 16:9, 1:2 (H, W)
    ds = data.get_dataset("folder", write_photos(tmp_path / "photos", shapes, classes=("face",)),
                          "unlabeled")
    images, ys, sizes = data.whole_images(ds, 32)
    side = data.whole_side(32)
    assert (side == 40 and images.shape == (4, 3, 40, 40) and images.dtype == torch.uint8
            and (ys == -1).all())
    assert sizes.tolist() == [list(s) for s in shapes]
    for x, o in zip(images, originals(ds)):  # the whole picture, squeezed: not a centre crop of it
        assert torch.equal(x, TF.resize(o, [side, side], antialias=True))
    # evaluation keeps its view of the original (short side resized, centre-cropped) in a cache of
    # its own
    centre, _ = data.uint8_images(ds, 32)
    for x, o in zip(centre, originals(ds)):
        assert torch.equal(x, TF.center_crop(TF.resize(o, 32, antialias=True), 32))
    cache = tmp_path / "cache" / "simclr"
    assert (len(list(cache.glob("folder-whole-*.pt"))) == 1
            and len(list(cache.glob("folder-*.pt"))) == 2)
    # from the cache, then indexed
    again = data.whole_images(torch.utils.data.Subset(ds, [3, 1]), 32)
    assert torch.equal(again[0], images[[3, 1]]) and torch.equal(again[2], sizes[[3, 1]])


def test_square_datasets_are_held_at_their_own_size(tmp_path, no_md5):
    from conftest import write_cifar
    cifar = data.get_dataset("cifar10", write_cifar(tmp_path / "c", n_train=10, n_test=5), "train",
                             download=False)
    images, ys, sizes = data.whole_images(cifar)
    plain, plain_ys = data.uint8_images(cifar)
    assert (torch.equal(images, plain) and torch.equal(ys, plain_ys)
            and sizes.tolist() == [[32, 32]] * 10)


# --------------------------------------------------------------------------------------- crop boxes

# the photos' (H, W): 4:3 ... 1:2, original
SHAPES = [(120, 160), (160, 120), (108, 192), (200, 100), (600, 512)]


def box_stats(boxes, height, width):
    """{name: (n,) float64} of boxes (n, 4) = (top, left, h, w) on a height x width original."""
    top, left, h, w = boxes.double().unbind(1)
    return dict(cy=(top + h / 2) / height, cx=(left + w / 2) / width, area=h * w / (height * width),
                aspect=w / h)


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of a and
    b."""
    a, b = np.sort(a), np.sort(b)
    pooled = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, pooled, "right") / len(a)
                  - np.searchsorted(b, pooled, "right") / len(b)).max()


def ks_critical(n, m, alpha=0.001):
    """The asymptotic critical value c(alpha) sqrt((n + m) / (n m)),
    c = sqrt(-ln(alpha / 2) / 2) = 1.95 at 0.001. Conservative for our discrete (whole-pixel) boxes,
    where ties only lower the statistic's null distribution."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def torchvision_boxes(height, width, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=0):
    torch.manual_seed(seed)
    img = torch.empty(1, height, width)
    return torch.tensor([v2.RandomResizedCrop.get_params(img, list(scale), list(ratio))
                         for _ in range(n)])


def test_crop_boxes_follow_torchvisions_sampler_on_each_original():
    """8000 boxes per shape from one batch of mixed per-sample sizes, against 4000 of torchvision's
    on each shape: box centre, area and aspect agree in mean (4 standard errors) and in distribution
    (KS at alpha = 0.001)."""
    per, ref_n = 8000, 4000
    sizes = torch.tensor(SHAPES).repeat(per, 1)  # (5 per, 2), the shapes interleaved
    p = batch_augment(32).sample_params(len(sizes), sizes[:, 0], sizes[:, 1],
                                        torch.Generator().manual_seed(0))
    assert torch.equal(p["sizes"], sizes.float())
    for k, (height, width) in enumerate(SHAPES):
        boxes = p["boxes"][k::len(SHAPES)]  # (per, 4)
        top, left, h, w = boxes.unbind(1)
        assert ((top >= 0).all() and (left >= 0).all() and (top + h <= height).all()
                and (left + w <= width).all())
        # the crops reach every side of the original (the old centre-cropped square never saw
        # a 4:3 photo's sides)
        assert ((top == 0).any() and (left == 0).any() and (top + h == height).any()
                and (left + w == width).any())
        ours = box_stats(boxes, height, width)
        theirs = box_stats(torchvision_boxes(height, width, ref_n, seed=k), height, width)
        for name in ours:
            a, b = ours[name].numpy(), theirs[name].numpy()
            se = math.sqrt(a.var() / len(a) + b.var() / len(b))
            assert abs(a.mean() - b.mean()) <= 4 * se, (height, width, name, a.mean(), b.mean())
            assert ks_statistic(a, b) < ks_critical(len(a), len(b)), (height, width, name)
    # the test has power: boxes drawn on the stored 40 x 40 square instead of the 200 x 100 original
    # (then mapped back to it) have aspects w/h twice too narrow
    sq = batch_augment(32).sample_params(per, 40, 40,
                                         torch.Generator().manual_seed(1))["boxes"].double()
    on_square = sq * torch.tensor([200 / 40, 100 / 40, 200 / 40, 100 / 40], dtype=torch.float64)
    wrong = box_stats(on_square, 200, 100)["aspect"].numpy()
    right = box_stats(torchvision_boxes(200, 100, ref_n), 200, 100)["aspect"].numpy()
    assert ks_statistic(wrong, right) > 10 * ks_critical(len(wrong), len(right))


@pytest.mark.parametrize("height,width,ratio", [(108, 192, (3 / 4, 4 / 3)),
                                                (200, 100, (3 / 4, 4 / 3)), (120, 160, (0.5, 0.6))])
def test_centre_fallback_clamps_the_ratio_as_torchvision(height, width, ratio):
    """Whole-area crops of an aspect outside `ratio` never fit: every box is torchvision's centre
    fallback, whose ratio is clamped into `ratio` (16:9 -> 4:3 wide, 1:2 -> 3:4, 4:3 -> 0.6)."""
    ours = batch_augment(32, crop_scale=(1.0, 1.0), crop_ratio=ratio).sample_params(
        500, torch.tensor([height] * 500), torch.tensor([width] * 500),
        torch.Generator().manual_seed(0))["boxes"]
    theirs = torchvision_boxes(height, width, 50, scale=(1.0, 1.0), ratio=ratio)
    assert (theirs == theirs[0]).all() and (ours == theirs[0]).all(), (ours[0], theirs[0])


def test_per_sample_sizes_equal_to_the_tensor_give_the_default_views():
    """sizes = the tensor's own (H, W) draws the same parameters and views as no sizes: bit for bit
    (the same float32 ops on the same values), so square datasets keep their views and resumes."""
    x = TF.pil_to_tensor(photo().resize((48, 48)))[None].repeat(6, 1, 1, 1)
    aug = batch_augment(32, blur_p=0.5, rotate_p=0.3)
    default = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(default, aug(x, torch.Generator().manual_seed(3),
                                    sizes=torch.tensor([[48, 48]] * 6)))


def test_both_views_of_an_image_draw_their_boxes_on_its_own_original():
    """sizes (B, 2) go with each image into both of its views: rows i and B + i."""
    x = TF.pil_to_tensor(photo().resize((48, 48)))[None].repeat(3, 1, 1, 1)
    sizes = torch.tensor([[120, 160], [200, 100], [48, 48]])
    aug = batch_augment(32, **PLAIN)
    views = aug(x, torch.Generator().manual_seed(3), sizes=sizes)
    height, width = sizes[[0, 1, 2, 0, 1, 2]].unbind(1)
    p = aug.sample_params(6, height, width, torch.Generator().manual_seed(3))
    assert torch.equal(views, aug.apply(x[[0, 1, 2, 0, 1, 2]], p))
    shuffled = aug.sample_params(6, *sizes[[1, 2, 0, 1, 2, 0]].unbind(1),
                                 torch.Generator().manual_seed(3))
    assert not torch.equal(views, aug.apply(x[[0, 1, 2, 0, 1, 2]], shuffled))


# ------------------------------------------------------------------------------ views of the photos

def test_views_read_the_box_on_a_non_square_original_exactly(tmp_path):
    """The pixels of the original itself (no stored square): each view is torchvision's resized_crop
    of the box."""
    ds = data.get_dataset("folder", write_photos(tmp_path / "p",
                                                 [(120, 160), (200, 100), (600, 512)],
                                                 classes=("face",)), "unlabeled")
    aug = batch_augment(48, **PLAIN)
    for o in originals(ds):
        x = o[None].expand(16, -1, -1, -1).float() / 255
        height, width = o.shape[1:]
        p = aug.sample_params(16, torch.tensor([height] * 16), torch.tensor([width] * 16),
                              torch.Generator().manual_seed(0))
        ours = aug.apply(x, p)
        for i, box in enumerate(p["boxes"].int().tolist()):
            theirs = TF.resized_crop(x[i], *box, [48, 48], antialias=False)
            # source coordinates on the original (<= 600 px: ulp 6e-5) by two formulas and a
            # [-1, 1] round trip, a few ulp apart: ~2e-4 px, times a neighbour difference <= 1, plus
            # the bilinear blend -> 3e-4. A box read half a pixel off moves a photo's pixels by
            # ~0.05.
            assert (ours[i] - theirs).abs().max().item() <= 3e-4, (height, width, box)


def read_stored(square, box, size, height, width):
    """The slow obvious reference, float64: torchvision's sample positions for box (top, left, h, w)
    on the height x width original (crop, then resize, align_corners=False), moved to the S x S
    square that holds the whole original, p_s = (p + 1/2) S / H - 1/2 (rows; columns with W), and
    read there bilinearly (edges clamped)."""
    s = square.shape[-1]
    top, left, h, w = box
    t = torch.arange(size, dtype=torch.float64) + 0.5
    # (size,)
    ys = ((top + (t * h / size - 0.5).clamp(0, h - 1) + 0.5) * s / height - 0.5).clamp(0, s - 1)
    xs = ((left + (t * w / size - 0.5).clamp(0, w - 1) + 0.5) * s / width - 0.5).clamp(0, s - 1)
    y0, x0 = ys.floor().long(), xs.floor().long()
    y1, x1 = (y0 + 1).clamp(max=s - 1), (x0 + 1).clamp(max=s - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]  # (size, 1), (1, size)
    q = square.double() / 255
    # (3, size, size)
    rows = lambda y: q[:, y][:, :, x0] * (1 - fx) + q[:, y][:, :, x1] * fx  # noqa: E731
    return rows(y0) * (1 - fy) + rows(y1) * fy


def local_range(o, gy, gx):
    """Per output pixel, max - min of the original's pixels in the 4 x 4 block around (gy, gx) (rows
    floor(gy) - 1 .. floor(gy) + 2): bilinear values of `o` at points within one pixel of (gy, gx)
    all lie in that range."""
    x = o[None].double() / 255
    # block starts one pixel up and left
    pad = lambda v: F.pad(v, (1, 2, 1, 2), mode="replicate")  # noqa: E731
    # (3, H, W)
    spread = (F.max_pool2d(pad(x), 4, stride=1) + F.max_pool2d(pad(-x), 4, stride=1))[0]
    iy = gy.floor().long().clamp(0, o.shape[1] - 1)
    ix = gx.floor().long().clamp(0, o.shape[2] - 1)
    return spread[:, iy[:, None], ix[None, :]]  # (3, size, size)


def test_views_from_the_stored_square_match_the_crop_of_the_original(tmp_path):
    """Photos no larger than the stored square (64 px views, S = 80): the square is a bilinear
    enlargement of the original, so each of its pixels is the original's bilinear surface at a point
    less than one original pixel from where it lands. A view's pixel, a blend of four such pixels
    around its sample point p, is then within the original's range around p (local_range) of
    torchvision's crop of the original, which reads that surface at p, plus the square's uint8
    rounding. Asserted at every pixel; reading the box as pixels of the square instead breaks it at
    a quarter of them."""
    # (H, W): 4:3, 1:2, 16:9, 3:4, each side <= 80
    shapes = [(60, 80), (80, 40), (45, 80), (80, 60)]
    ds = data.get_dataset("folder", write_photos(tmp_path / "p", shapes, classes=("face",)),
                          "unlabeled")
    images, _, sizes = data.whole_images(ds, 64)
    aug, n = batch_augment(64, **PLAIN), 32
    wrong_pixels = []
    for square, (height, width), o in zip(images, sizes.tolist(), originals(ds)):
        enlarged = F.interpolate(o[None].double(), (80, 80), mode="bilinear",
                                 align_corners=False)[0]
        # the premise: uint8 rounding after each of the two separable passes (0.5 level each) and
        # fixed-point weights (< 0.1 level) keep the stored square within 1.1 levels of the exact
        # enlargement
        assert (square.double() - enlarged).abs().max().item() <= 1.1
        p = aug.sample_params(n, torch.tensor([height] * n), torch.tensor([width] * n),
                              torch.Generator().manual_seed(0))
        ours = aug.apply(square[None].expand(n, -1, -1, -1), p)
        theirs = torch.stack([TF.resized_crop(o.double() / 255, *b, [64, 64], antialias=False)
                              for b in p["boxes"].int().tolist()])
        gx, gy = A.crop_coords(p["boxes"], 64, height, width)  # (n, 64) in [-1, 1]
        # original pixels
        gx, gy = ((gx.double() + 1) * width - 1) / 2, ((gy.double() + 1) * height - 1) / 2
        bound = torch.stack([local_range(o, gy[i], gx[i]) for i in range(n)])
        # + 1.1 / 255: the square's rounding above; + 1e-4: float32 coordinates and blend (as in the
        # exact test)
        assert ((ours - theirs).abs() <= bound + 1.1 / 255 + 1e-4).all(), (height, width)
        mis = dict(p, sizes=torch.full((n, 2), 80.0))  # the box read as pixels of the square
        wrong = aug.apply(square[None].expand(n, -1, -1, -1), mis)
        wrong_pixels.append(
            ((wrong - theirs).abs() > bound + 1.1 / 255 + 1e-4).double().mean().item())
    # measured 0.25-0.36: the bound tells a misread box apart
    assert min(wrong_pixels) > 0.1, wrong_pixels


def test_views_of_large_photos_read_the_box_from_the_stored_square(tmp_path):
    """Photos larger than the square (the 512 x 600 original; 32 px views, S = 40): each view is
    exactly the box mapped onto the square (read_stored), and, the square having lost the detail
    finer than 40 px across, close on average to SimCLRTransform's crop of the original."""
    ds = data.get_dataset("folder", write_photos(tmp_path / "p",
                                                 [(600, 512), (120, 160), (200, 100)],
                                                 classes=("face",)), "unlabeled")
    images, _, sizes = data.whole_images(ds, 32)
    aug, n = batch_augment(32, **PLAIN), 32
    for square, (height, width), o in zip(images, sizes.tolist(), originals(ds)):
        p = aug.sample_params(n, torch.tensor([height] * n), torch.tensor([width] * n),
                              torch.Generator().manual_seed(1))
        ours = aug.apply(square[None].expand(n, -1, -1, -1), p).double()
        boxes = p["boxes"].int().tolist()
        ref = torch.stack([read_stored(square, b, 32, height, width) for b in boxes])
        # float32 coordinates through the original's pixels (<= 600 px, ulp 6e-5) and [-1, 1]: a few
        # ulp of the relative position, ~3e-5 px of the square, times a neighbour difference <= 1,
        # plus the blend -> 1e-4. Mapping rows by S/W or a half-pixel shift moves pixels by ~0.05.
        assert (ours - ref).abs().max().item() <= 1e-4, (height, width)
        theirs = torch.stack([TF.resized_crop(o.double() / 255, *b, [32, 32], antialias=True)
                              for b in boxes])
        # not a bound but a measure of what the square loses: mean |difference| 0.03-0.05 on these
        # photos (the 1:2 one loses most), 0.08 allows other JPEG decoders and seeds; the box read
        # as pixels of the square gives 0.30
        assert (ours - theirs).abs().mean().item() <= 0.08, (height, width)


# ------------------------------------------------------------------------------------- memory check

def test_memory_check_is_one_line_and_comes_before_any_decoding(tmp_path, monkeypatch, capsys):
    assert data.check_fits(1, 10, 600) is None  # 300 bytes: exactly half of what is available
    assert data.check_fits(10 ** 9, 280, None) is None  # available memory unknown: no check
    with pytest.raises(data.TooLargeToHold) as e:
        data.check_fits(1, 10, 599)
    msg = str(e.value)
    assert "\n" not in msg and "GiB" in msg and "--" not in msg  # data.py names no script's flags

    photos = write_photos(tmp_path / "p", [(120, 160), (200, 100)])
    ds = data.get_dataset("folder", photos, "unlabeled")
    need = 4 * 3 * data.whole_side(32) ** 2  # 4 images of 3 x 40 x 40 bytes
    monkeypatch.setattr(data, "available_memory", lambda: 2 * need - 1)
    monkeypatch.setattr(data, "_load_or_neighbour", lambda *a: pytest.fail("decoded an image"))
    for make in (lambda: data.whole_images(ds, 32),
                 lambda: data.TwoViewBatches(ds, 2, 0, 1, 0, "cpu", batch_augment=batch_augment(32),
                                             image_size=32)):
        with pytest.raises(data.TooLargeToHold) as e:
            make()
        assert "\n" not in str(e.value)
    # train.py turns it into one line that names its flags
    argv = ["--dataset", "folder", "--data-dir", str(photos), "--image-size", "32",
            "--batch-size", "2", "--output-dir", str(tmp_path / "run")]
    err = one_line_exit_2(capsys, lambda: train.main(train.get_args_parser().parse_args(argv)))
    assert "--pipeline per-image" in err and "--image-size" in err
    assert not (tmp_path / "cache" / "simclr").exists()
    monkeypatch.undo()
    monkeypatch.setattr(data, "available_memory", lambda: 2 * need)  # just enough
    assert data.whole_images(ds, 32)[0].nbytes == need


# ------------------------------------------------------------------------------ batches and preview

def test_two_view_batches_pass_each_images_original_size(tmp_path):
    shapes = [(120, 160), (160, 120), (108, 192), (200, 100)]
    ds = data.get_dataset("folder", write_photos(tmp_path / "p", shapes), "unlabeled")
    images, _, sizes = data.whole_images(ds, 32)
    seen = []

    def spy(x, generator, sizes):
        seen.append((x, sizes))
        return x.repeat(2, 1, 1, 1)  # two "views"

    batches = data.TwoViewBatches(ds, 3, 0, 1, 0, "cpu", batch_augment=spy, image_size=32)
    assert sum(1 for _ in batches.epoch(0)) == 2
    for x, s in seen:  # each row's size is that of its image
        rows = [next(j for j in range(len(images)) if torch.equal(images[j], xi)) for xi in x]
        assert len(rows) == 3 and torch.equal(s, sizes[rows])
    # with BatchAugment: the views of a resumed epoch are those of an uninterrupted one
    aug = batch_augment(32)
    whole = [v for v, _ in data.TwoViewBatches(ds, 3, 0, 1, 0, "cpu", batch_augment=aug,
                                               image_size=32).epoch(0)]
    resumed = [v for v, _ in data.TwoViewBatches(ds, 3, 0, 1, 0, "cpu", batch_augment=aug,
                                                 image_size=32).epoch(0, 1)]
    assert len(resumed) == 1 and torch.equal(resumed[0], whole[1])


def test_preview_of_28px_images_has_tiles_of_at_least_96px(tmp_path):
    imgs = [variant(photo(), 28, 28, lower=i % 2 == 1, flip=False) for i in range(3)]
    path = A.save_preview(imgs, simclr_transform(28), tmp_path / "aug.png")
    with Image.open(path) as png:
        w, h = png.size
        grid = TF.pil_to_tensor(png.convert("RGB"))
    tile = 28 * 4  # the smallest whole multiple of 28 that reaches 96
    # 3 columns (images), 3 rows (image, view 1, view 2)
    assert (w, h) == (3 * (tile + 2) + 2, 3 * (tile + 2) + 2)
    # (3, 112, 112) the first image's tile: 4 x 4 blocks of one pixel
    first = grid[:, 2:2 + tile, 2:2 + tile]
    assert torch.equal(first, first[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2))


# --------------------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("pipeline", ["batched", "per-image"])
def test_train_then_eval_on_a_folder_of_photos(tmp_path, capsys, pipeline):
    """train.py a few steps on a folder of photos of five aspect ratios, then eval_linear.py on its
    checkpoint."""
    # 4:3 3:4 16:9 1:2 2:1 1:1
    shapes = [(90, 120), (120, 90), (72, 128), (120, 60), (60, 120), (96, 96)]
    root = write_photos(tmp_path / "photos", shapes, splits=("train", "test"))
    out = tmp_path / "run"
    import eval_linear
    import train
    train.main(train.get_args_parser().parse_args([
        "--dataset", "folder", "--data-dir", root, "--image-size", "32", "--arch", "resnet18",
        "--width", "0.125", "--batch-size", "8", "--max-steps", "2", "--amp", "off",
        "--no-aug-compile", "--workers", "0", "--pipeline", pipeline, "--output-dir", str(out)]))
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    with Image.open(out / "augmentations.png") as png:
        assert min(png.size) >= 3 * (96 + 2) + 2  # 32 px views shown at 96 px
    capsys.readouterr()
    eval_linear.main(eval_linear.get_args_parser().parse_args(
        ["--ckpt", str(out / "last.pt"), "--max-train-samples", "12"]))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dataset"] == "folder" and 0 <= result["top1"] <= 100
    with open(out / "eval_folder.json") as f:
        assert json.load(f)["top1"] == result["top1"]
