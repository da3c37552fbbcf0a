"""SimCLR's data augmentation (arXiv 2002.05709, appendix A): two random views of each image from
crop + flip, colour distortion, grayscale, Gaussian blur and optional rotation and solarization.
"""
import torch
import torchvision
from torchvision.transforms import v2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def blur_kernel_size(size):
    """About 10% of the image side, odd, at least 3 (paper, appendix A)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


class SimCLRTransform:
    """Called on a PIL image or a uint8 (C, H, W) tensor, returns (view1, view2): two independent draws of
    the augmentation, float32 (3, size, size), normalised. Defaults are the paper's ImageNet recipe:
    s: colour distortion strength (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), the paper uses 0.5 on CIFAR).
    blur_p: None means 0.5, and 0 (no blur) for images of 32 px or less as in the paper's CIFAR recipe.
    rotate_p: probability of a rotation by 90, 180 or 270 degrees (the paper's 'rotate'; off by default).
    solarize_p: probability of solarization (not in SimCLR v1; BYOL uses it).
    """

    def __init__(self, size, s=1.0, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5,
                 jitter_p=0.8, gray_p=0.2, blur_p=None, blur_sigma=(0.1, 2.0), rotate_p=0.0, solarize_p=0.0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.mean, self.std = size, mean, std
        blur_p = (0.5 if size > 32 else 0.0) if blur_p is None else blur_p
        ops = [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=tuple(crop_ratio), antialias=True),
            v2.RandomHorizontalFlip(flip_p),
        ]
        if rotate_p > 0:
            ops.append(v2.RandomApply([v2.RandomChoice([v2.RandomRotation((a, a)) for a in (90, 180, 270)])],
                                      p=rotate_p))
        if jitter_p > 0 and s > 0:
            ops.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=jitter_p))
        if gray_p > 0:
            ops.append(v2.RandomGrayscale(gray_p))
        if blur_p > 0:
            ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=tuple(blur_sigma))],
                                      p=blur_p))
        if solarize_p > 0:
            ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        self.transform = v2.Compose(ops)

    def __call__(self, img):
        return self.transform(img), self.transform(img)

    def __repr__(self):
        return f"SimCLRTransform({self.transform})"


def eval_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Deterministic: resize the short side to `size`, centre-crop, normalise."""
    return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def save_preview(images, transform, path, seed=0):
    """Write a PNG grid with one column per image: the image, then its two views (un-normalised)."""
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    plain = eval_transform(transform.size, transform.mean, transform.std)
    rows = [[], [], []]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for img in images:
            v1, v2_ = transform(img)
            for row, t in zip(rows, (plain(img), v1, v2_)):
                row.append((t * std + mean).clamp(0, 1))  # (3, size, size)
    grid = torchvision.utils.make_grid(torch.stack(rows[0] + rows[1] + rows[2]), nrow=len(images), padding=2)
    torchvision.utils.save_image(grid, path)
    return path
