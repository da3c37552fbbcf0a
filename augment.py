"""SimCLR's data augmentation (arXiv 2002.05709, appendix A): two random views of each image from
crop, flip, colour distortion, grayscale, blur (and optionally rotation), per image with
torchvision.transforms.v2 (SimCLRTransform) or for a whole batch on the device (BatchAugment)."""
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageSpec:
    """The images a network is fed: squares of `size` px, normalised by channel mean and std."""
    size: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def transform(self):
        """The evaluation view of one PIL image or uint8 (C, H, W) tensor: the short side resized to
        `size`, the centre crop, normalised."""
        return v2.Compose([v2.ToImage(), v2.Resize(self.size, antialias=True),
                           v2.CenterCrop(self.size), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(self.mean, self.std)])

    def batch(self, images):
        """transform() for a batch: uint8 (B, C, H, W), C 1 or 3 -> normalised float
        (B, 3, size, size)."""
        x = images.float() / 255
        h, w = x.shape[-2:]
        if h != self.size or w != self.size:  # resize the short side to size, then centre-crop
            s = self.size / min(h, w)
            new = (max(self.size, round(h * s)), max(self.size, round(w * s)))
            x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
            top = (x.shape[-2] - self.size) // 2
            left = (x.shape[-1] - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        return self.normalize(x.expand(-1, 3, -1, -1))

    def normalize(self, x):
        """(B, 3, H, W) in [0, 1] -> normalised."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def unnormalize(self, x):
        """Normalised (..., 3, H, W) -> [0, 1], for pictures."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x * std + mean).clamp(0, 1)


@dataclass(frozen=True)
class Recipe:
    """The distributions of the augmentation; the defaults are the paper's ImageNet recipe.
    s: colour distortion strength, ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with probability jitter_p
    (the paper uses s = 0.5 on CIFAR). blur_p: None means 0.5, and 0 (no blur) for views of 32 px
    or less, as in the paper's CIFAR recipe. rotate_p: a rotation by 90, 180 or 270 degrees (the
    paper's 'rotate', Figure 5; off by default)."""
    s: float = 1.0
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = None
    blur_sigma: tuple = (0.1, 2.0)
    rotate_p: float = 0.0

    def blur_probability(self, size):
        if self.blur_p is not None:
            return self.blur_p
        return 0.5 if size > 32 else 0.0


def blur_kernel_size(size):
    """About 10% of the image side, odd, at least 3 (paper, appendix A)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


class SimCLRTransform:
    """Called on a PIL image or a uint8 (C, H, W) tensor, returns (view1, view2): two independent
    draws of the augmentation `recipe`, float32 (3, size, size), normalised as `spec` says; `views`
    of them if another number (the small crops of multi-crop)."""

    def __init__(self, spec, recipe=Recipe(), views=2):
        self.spec = spec
        self.views = views
        r = recipe
        ops = [
            v2.ToImage(),
            v2.RandomResizedCrop(spec.size, scale=tuple(r.crop_scale), ratio=tuple(r.crop_ratio),
                                 antialias=True),
            v2.RandomHorizontalFlip(r.flip_p),
        ]
        if r.rotate_p > 0:
            turns = [v2.RandomRotation((a, a)) for a in (90, 180, 270)]
            ops.append(v2.RandomApply([v2.RandomChoice(turns)], p=r.rotate_p))
        if r.jitter_p > 0 and r.s > 0:
            jitter = v2.ColorJitter(0.8 * r.s, 0.8 * r.s, 0.8 * r.s, 0.2 * r.s)
            ops.append(v2.RandomApply([jitter], p=r.jitter_p))
        if r.gray_p > 0:
            ops.append(v2.RandomGrayscale(r.gray_p))
        blur_p = r.blur_probability(spec.size)
        if blur_p > 0:
            blur = v2.GaussianBlur(blur_kernel_size(spec.size), sigma=tuple(r.blur_sigma))
            ops.append(v2.RandomApply([blur], p=blur_p))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
        self.transform = v2.Compose(ops)

    def __call__(self, img):
        return tuple(self.transform(img) for _ in range(self.views))

    def __repr__(self):
        return f"SimCLRTransform({self.transform})"


def save_preview(images, transform, path, seed=0, min_tile=96):
    """Write a PNG grid with one column per image: the image, then its two views (un-normalised).
    Each tile is enlarged by a whole factor, nearest neighbour, to at least min_tile px: a 28 px
    view is legible at 112 px."""
    spec = transform.spec
    plain = spec.transform()
    rows = [[], [], []]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for img in images:
            v1, v2_ = transform(img)
            for row, t in zip(rows, (plain(img), v1, v2_)):
                row.append(spec.unnormalize(t))  # (3, size, size)
    tiles = torch.stack(rows[0] + rows[1] + rows[2])  # (3n, 3, S, S)
    grid = torchvision.utils.make_grid(enlarge(tiles, min_tile), nrow=len(images), padding=2)
    torchvision.utils.save_image(grid, path)
    return path


def enlarge(images, min_side):
    """(B, C, S, S) -> (B, C, kS, kS), every pixel a k x k block, k the smallest whole factor
    reaching min_side."""
    k = max(1, math.ceil(min_side / images.shape[-1]))
    return images.repeat_interleave(k, 2).repeat_interleave(k, 3)


# --------------------------------------------------------------------------------------------------
# Batched augmentation: every op takes a float batch (B, C, H, W) in [0, 1] and parameters (B,).

def crop_coords(boxes, size, height, width, flip=None):
    """grid_sample coordinates in [-1, 1] (align_corners=False) of crop boxes (B, 4) =
    (top, left, height, width) resized to size x size: (gx (B, S), gy (B, S)). Bilinear like
    torchvision's resize of the cropped pixels, whose edge pixels are clamped to the box; flip (B,)
    bool mirrors the columns. height, width: the size of the image the boxes are drawn on, ints or
    (B,) tensors; the coordinates are fractions of that image, so they read the same points from any
    resize of it (a folder image stored as a square)."""
    top, left, h, w = boxes.float().unbind(1)  # (B,) each
    t = torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5  # output pixel centres
    # (B, S): the source pixel of each output column (gx) and row (gy), clamped to the box
    gx = left[:, None] + (t * w[:, None] / size - 0.5).clamp(min=0).minimum(w[:, None] - 1)
    gy = top[:, None] + (t * h[:, None] / size - 0.5).clamp(min=0).minimum(h[:, None] - 1)
    if flip is not None:
        gx = torch.where(flip[:, None], gx.flip(1), gx)
    if isinstance(height, torch.Tensor):  # per sample, (B,) -> (B, 1) against the (B, S) pixels
        height = height.to(gy.device, torch.float32)[:, None]
        width = width.to(gx.device, torch.float32)[:, None]
    return (2 * gx + 1) / width - 1, (2 * gy + 1) / height - 1


def sample_grid(gx, gy, rot=None):
    """(B, S, S, 2) grid from the separable coordinates; rot (B,) turns the output by
    rot x 90 degrees counter-clockwise (torch.rot90), by reading the coordinates along the other
    axis, reversed as needed."""
    b, size = gx.shape

    def along_columns(v):  # (B, S) -> (B, S, S), varying along the columns
        return v[:, None, :].expand(b, size, size)

    def along_rows(v):
        return v[:, :, None].expand(b, size, size)

    x = along_columns(gx)
    y = along_rows(gy)
    if rot is not None:
        k = rot.view(b, 1, 1) % 4  # (B, 1, 1) quarter turns
        x_turned = [x, along_rows(gx.flip(1)), along_columns(gx.flip(1)), along_rows(gx)]
        y_turned = [y, along_columns(gy), along_rows(gy.flip(1)), along_columns(gy.flip(1))]
        for turns in (1, 2, 3):
            x = torch.where(k == turns, x_turned[turns], x)
            y = torch.where(k == turns, y_turned[turns], y)
    return torch.stack([x, y], dim=-1)


def luma_weights(channels, device=None):
    """ITU-R 601-2 luma weights (torchvision's grayscale) for RGB; a single channel is its own luma.
    Filled on `device`: torch.tensor of a list there would be a blocking host-to-device copy on
    every call."""
    if channels != 3:
        return torch.ones(1, device=device)
    return torch.stack([torch.full((), v, device=device) for v in (0.2989, 0.587, 0.114)])  # (3,)


def grayscale(x):
    """(B, C, H, W) -> (B, 1, H, W) luma."""
    if x.shape[1] == 1:
        return x
    return x[:, 0:1] * 0.2989 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def color_maps(kind, f, w):
    """torchvision's brightness (kind 0: f x), contrast (1: f x + (1-f) mean luma) and saturation
    (2: f x + (1-f) luma(x)) with factors f (B,), any other kind the identity, as affine maps of the
    pixel: (mat (B, C, C), coef (B,)) for color_affine. w: luma weights (C,)."""
    f = torch.where(kind < 3, f, torch.ones_like(f))
    eye = torch.eye(len(w), device=f.device)
    sat = torch.where(kind == 2, 1 - f, torch.zeros_like(f))
    mat = f[:, None, None] * eye + sat[:, None, None] * w  # (B, C, C): each row also gets (1-f) w
    return mat, torch.where(kind == 1, 1 - f, torch.zeros_like(f))


def color_affine(x, mat, coef, w):
    """clamp(mat @ pixel + coef * mean luma, 0, 1) for every pixel: a different colour map per
    sample in one batched matmul. x (B, C, H, W), mat (B, C, C), coef (B,), w luma weights (C,)."""
    b, c, h, wd = x.shape
    # a product and a sum over C, not a matmul (its rounding depends on B): same view in any chunk
    mean_luma = (x.mean(dim=(2, 3)) * w).sum(1)  # (B,)
    offset = (coef * mean_luma).view(b, 1, 1).expand(b, c, 1)  # (B, C, 1)
    y = torch.baddbmm(offset, mat, x.reshape(b, c, h * wd))  # (B, C, C) @ (B, C, H W)
    return y.view(b, c, h, wd).clamp_(0, 1)


def adjust_hue(x, f):
    """Shift the hue by f (B,) turns, f in [-0.5, 0.5], keeping HSV saturation and value, as
    torchvision's RGB -> HSV -> RGB round trip but without forming S: each channel is
    v - chroma * ramp(hue position). Arithmetic masks: torch.where is slow on the CPU."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)  # (B, H, W) each
    v = x.amax(1)
    chroma = v - x.amin(1)
    is_r = (v == r).to(x.dtype)
    is_g = (v == g).to(x.dtype) * (1 - is_r)
    num = is_r * (g - b) + is_g * (b - r + 2 * chroma) + (1 - is_r - is_g) * (r - g + 4 * chroma)
    h6 = num / chroma.clamp(min=1e-12) + 6 * f.view(-1, 1, 1)  # hue in sixths of a turn, shifted
    # offsets 5, 3, 1 for R, G, B filled on the device, not copied from a host list on every call
    offsets = torch.arange(5, 0, -2, device=x.device, dtype=h6.dtype).view(1, 3, 1, 1)
    k = offsets + h6[:, None]  # (B, 3, H, W)
    k = k - 6 * torch.floor(k / 6)  # mod 6
    return v[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur with a per-sample sigma (B,), reflect padding, as torchvision's."""
    b, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    kern = torch.exp(-0.5 * (t / sigma.clamp(min=1e-6)[:, None]) ** 2)  # (B, k)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B C, k)
    p = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (p, p, p, p), mode="reflect")  # (1, B C, H + 2p, W + 2p)
    y = F.conv2d(y, kern.view(b * c, 1, 1, kernel_size), groups=b * c)  # (1, B C, H + 2p, W)
    y = F.conv2d(y, kern.view(b * c, 1, kernel_size, 1), groups=b * c)  # (1, B C, H, W)
    return y.view(b, c, h, w)


def gray_and_normalize(x, gray, mean, std):
    """Grayscale (gray (B,) 0/1, as a lerp that is exactly x or its luma), then normalise to
    (B, 3, H, W)."""
    if x.shape[1] == 3:
        x = torch.lerp(x, grayscale(x).expand_as(x), gray.view(-1, 1, 1, 1))
    return (x.expand(-1, 3, -1, -1) - mean) / std


class Compiled:
    """fn through torch.compile (dynamic shapes): the elementwise chains of hue and
    gray_and_normalize become one fused loop each, 10x faster on the CPU. Where compiling fails (no
    C++ compiler, ...), fn itself, after one warning."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # any compiler failure: run eagerly from now on
                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}); "
                              "running it eagerly")
                self.compiled = None
        return self.fn(*args)


class BatchAugment(torch.nn.Module):
    """SimCLRTransform for a whole batch on any device: uint8 or float (B, C, H, W), C 1 or 3 -> two
    normalised views (2B, 3, size, size), view 1 of image i at row i and view 2 at row B + i (as
    loss.nt_xent takes them), each sample with its own parameters drawn from the recipe's
    distributions as torchvision draws them, in vectorised ops (no Python loop over samples);
    `views=1` gives one. Colour jitter keeps torchvision's random order of the four ops, per
    sample."""

    def __init__(self, spec, recipe=Recipe(), compile=False):
        super().__init__()
        if 0.2 * recipe.s > 0.5:
            raise ValueError(f"colour strength s={recipe.s} gives a hue range above 0.5: "
                             "use s <= 2.5")
        self.size = spec.size
        self.recipe = recipe
        self.blur_p = recipe.blur_probability(spec.size)
        self.kernel_size = blur_kernel_size(spec.size)
        # CPU: bytes of float pixels per chunk (4 MiB), so that its passes stay in the cache
        self.cpu_chunk_bytes = 4 << 20
        self.hue = Compiled(adjust_hue) if compile else adjust_hue
        self.gray_and_normalize = Compiled(gray_and_normalize) if compile else gray_and_normalize
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def sample_params(self, b, height, width, generator=None, device=None):
        """Per-sample parameters (dict of (B, ...) tensors), drawn as torchvision's transforms draw
        them. The crop box is drawn on an image of height x width: ints, or (B,) tensors of each
        sample's original size."""
        r = self.recipe

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=device)

        def per_sample(side):
            """(B,) float32: exact below 2^24, so float32 ops on it are those of an int side."""
            if isinstance(side, torch.Tensor):
                return side.to(device, torch.float32).expand(b)
            return torch.full((b,), side, dtype=torch.float32, device=device)  # no host copy

        height = per_sample(height)
        width = per_sample(width)
        # RandomResizedCrop: 10 tries of (area scale, log aspect ratio); first fit, else the centre
        area = (height * width)[:, None]  # (B, 1)
        scale = r.crop_scale[0] + (r.crop_scale[1] - r.crop_scale[0]) * rand(b, 10)
        lo, hi = math.log(r.crop_ratio[0]), math.log(r.crop_ratio[1])
        ratio = torch.exp(lo + (hi - lo) * rand(b, 10))
        w = torch.sqrt(area * scale * ratio).round()  # (B, 10)
        h = torch.sqrt(area * scale / ratio).round()
        ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
        w = w.gather(1, first)[:, 0]
        h = h.gather(1, first)[:, 0]
        found = ok.any(1)
        # the centre fallback clamps the image's own ratio into crop_ratio, rounding in float64 as
        # Python's round() does
        in_ratio = width.double() / height.double()
        widest = (height.double() * r.crop_ratio[1]).round()
        tallest = (width.double() / r.crop_ratio[0]).round()
        fw = torch.where(in_ratio > r.crop_ratio[1], widest, width.double())
        fh = torch.where(in_ratio < r.crop_ratio[0], tallest, height.double())
        w = torch.where(found, w, fw.float())
        h = torch.where(found, h, fh.float())
        top = torch.where(found, (rand(b) * (height - h + 1)).floor(), (height - h) // 2)
        left = torch.where(found, (rand(b) * (width - w + 1)).floor(), (width - w) // 2)
        lo_f = max(0.0, 1 - 0.8 * r.s)
        hi_f = 1 + 0.8 * r.s
        no_turn = torch.zeros(b, dtype=torch.long, device=device)
        # the draws below in this order (condition, then value): the views of a seed stay the same
        return dict(
            boxes=torch.stack([top, left, h, w], dim=1),  # (B, 4) in pixels of an image of `sizes`
            sizes=torch.stack([height, width], dim=1),  # (B, 2)
            flip=rand(b) < r.flip_p,
            # quarter turns: 0, or 1-3 with probability rotate_p
            rot=torch.where(rand(b) < r.rotate_p, 1 + (rand(b) * 3).floor().long(), no_turn),
            jitter=(rand(b) < r.jitter_p) & (r.s > 0),
            # (B, 4): the factors of brightness, contrast, saturation, hue
            factors=torch.cat([lo_f + (hi_f - lo_f) * rand(b, 3),
                               0.2 * r.s * (2 * rand(b, 1) - 1)], dim=1),
            order=rand(b, 4).argsort(1),  # (B, 4): each sample's order of the four colour ops
            gray=rand(b) < r.gray_p,
            sigma=torch.where(rand(b) < self.blur_p,
                              r.blur_sigma[0] + (r.blur_sigma[1] - r.blur_sigma[0]) * rand(b),
                              torch.zeros(b, device=device)),  # 0: no blur
        )

    def forward(self, images, generator=None, sizes=None, views=2):
        """`views` views of `images` (B, C, H, W): (views B, 3, size, size), view k of image i at
        row k B + i, every view an independent draw. sizes (B, 2): each sample's original (H, W),
        where `images` holds it resized (a folder image stored whole as a square,
        data.whole_images): the crop box is drawn on the original, as SimCLRTransform draws it, and
        read from the resized pixels. None: the tensor's own size. The parameters are drawn on the
        generator's device, by default the CPU: then everything that depends on them is known on
        the host and reaches the GPU without any stream sync."""
        images = images.repeat(views, 1, 1, 1)  # (views B, C, H, W)
        b, _, height, width = images.shape
        device = generator.device if generator is not None else torch.device("cpu")
        if sizes is not None:
            height, width = sizes.to(device).repeat(views, 1).unbind(1)  # (views B,) each
        return self.apply(images, self.sample_params(b, height, width, generator, device))

    def apply(self, images, p):
        """The view of `images` under the parameters p. Per-sample constants are built once for the
        batch, where p lives; on the CPU the pixels then go through in chunks of about
        cpu_chunk_bytes, so that the passes over a chunk stay in the cache."""
        r = self.recipe
        b, c, height, width = images.shape
        if "sizes" in p:  # the boxes are on the originals, which `images` may hold resized
            height, width = p["sizes"].unbind(1)  # (B,) each
        gx, gy = crop_coords(p["boxes"], self.size, height, width, p["flip"])  # (B, S) each
        w = luma_weights(c, gx.device)
        # op (B, 4): the colour op of each round per sample; 4 (skip) where jitter is off
        op = torch.where(p["jitter"][:, None], p["order"], torch.full_like(p["order"], 4))
        rounds = []
        for t in range(4 if r.jitter_p > 0 and r.s > 0 else 0):
            # (B,) this round's factor
            f = p["factors"].gather(1, op[:, t].clamp(max=3)[:, None])[:, 0]
            hue = torch.where(op[:, t] == 3, f, torch.zeros_like(f))
            rounds.append((*color_maps(op[:, t], f, w), hue))
        # index tensors of the samples that need hue in each round, and blur
        # (one host read when p is on a GPU)
        masks = [op[:, t] == 3 for t in range(len(rounds))] if c == 3 else []
        masks.append(p["sigma"] > 0 if self.blur_p > 0 else torch.zeros_like(p["flip"]))
        counts = torch.stack([m.sum() for m in masks]).tolist()
        # the indices where the mask is True: a stable sort puts them first
        subsets = [(~m).to(torch.uint8).argsort(stable=True)[:n] for m, n in zip(masks, counts)]
        no_gray = torch.zeros_like(p["sigma"])
        plan = dict(
            gx=gx, gy=gy, rot=p["rot"] if r.rotate_p > 0 else None, w=w, rounds=rounds,
            subsets=subsets, sigma=p["sigma"],
            gray=p["gray"].float() if r.gray_p > 0 else no_gray)
        plan = _to_device(plan, images.device)

        out = torch.empty(b, 3, self.size, self.size, device=images.device)
        chunk = b if images.is_cuda else max(1, self.cpu_chunk_bytes // (4 * c * self.size ** 2))
        for i in range(0, b, chunk):
            j = min(b, i + chunk)
            # each subset's indices inside this chunk
            local = [idx if chunk >= b else idx[(idx >= i) & (idx < j)] - i
                     for idx in plan["subsets"]]
            rot = None if plan["rot"] is None else plan["rot"][i:j]
            grid = sample_grid(plan["gx"][i:j], plan["gy"][i:j], rot)  # (n, S, S, 2)
            x = F.grid_sample(images[i:j].float(), grid, mode="bilinear", padding_mode="border",
                              align_corners=False)  # (n, C, S, S)
            if images.dtype == torch.uint8:
                x = x.mul_(1 / 255)  # after the crop: fewer pixels
            for t, (mat, coef, hue) in enumerate(plan["rounds"]):
                x = color_affine(x, mat[i:j], coef[i:j], plan["w"])
                if c == 3 and len(local[t]):
                    x.index_copy_(0, local[t], self.hue(x[local[t]], hue[i:j][local[t]]))
            blur = local[-1]
            # blur before grayscale: both are linear and act alike on every channel, so they commute
            if len(blur):
                blurred = gaussian_blur(x[blur], plan["sigma"][i:j][blur], self.kernel_size)
                x.index_copy_(0, blur, blurred)
            out[i:j] = self.gray_and_normalize(x, plan["gray"][i:j], self.mean,
                                               self.std)  # (n, 3, S, S)
        return out


def _to_device(obj, device):
    """Tensors (in dicts, lists, tuples) to `device`; to a GPU from pinned memory, non-blocking."""
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    if not isinstance(obj, torch.Tensor) or obj.device == device:
        return obj
    if device.type == "cuda" and obj.device.type == "cpu":
        return obj.pin_memory().to(device, non_blocking=True)
    return obj.to(device)
