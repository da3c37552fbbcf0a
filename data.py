"""Datasets for SimCLR (arXiv 2002.05709): STL-10, CIFAR-10/100, Fashion-MNIST (torchvision's own
loaders) and a folder of images, each sample (RGB image, label or -1); a dataset that fits in memory
is also held as one uint8 tensor and batched by index (ResidentImages, TwoViewBatches)."""
import gzip
import hashlib
import itertools
import math
import os
import shutil
import warnings

import torch
import torchvision
from PIL import Image

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's package dataset-fashion-mnist

NETWORK = "or run once with network access so torchvision downloads it"
# name -> default image size, normalisation, pretraining split, number of classes, how to get it
DATASETS = {
    "stl10": dict(size=96, mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713),
                  pretrain_split="train+unlabeled", num_classes=10,
                  get="download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (2.6 GB) "
                      f"and extract it there (giving stl10_binary/), {NETWORK}"),
    "cifar10": dict(size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    pretrain_split="train", num_classes=10,
                    get="download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and "
                        f"extract it there, {NETWORK}"),
    "cifar100": dict(size=32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     pretrain_split="train", num_classes=100,
                     get="download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and "
                         f"extract it there, {NETWORK}"),
    "fashion-mnist": dict(size=28, mean=(0.2860,) * 3, std=(0.3530,) * 3,
                          pretrain_split="train", num_classes=10,
                          get="run `apt-get install -y dataset-fashion-mnist` (files land in "
                              f"{DEBIAN_FASHION_MNIST}), or put the four idx files of "
                              "github.com/zalandoresearch/fashion-mnist in the data folder"),
    "folder": dict(size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   pretrain_split="unlabeled", num_classes=None,
                   get="give a folder of images as the data folder (class sub-folders of "
                       "DIR/train and DIR/test for evaluation)"),
}
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


class DatasetError(Exception):
    """A dataset that is missing or unusable; the message is one line that says what to do."""


class TooLargeToHold(DatasetError):
    """A dataset that would not fit in memory as one tensor: decode it per image instead, or store
    it smaller."""


class ToRGB:
    """PIL image of any mode (L, RGBA, P, ...) -> RGB, so that every dataset yields 3 channels."""

    def __call__(self, img):
        return img if img.mode == "RGB" else img.convert("RGB")


def _with_rgb(transform):
    return ToRGB() if transform is None else torchvision.transforms.Compose([ToRGB(), transform])


def cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "simclr")


def _atomic_save(path, write):
    """write(temp path), then os.replace: a cache entry is whole or absent, also when two runs fill
    it at once."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


class IdxFashionMNIST(torchvision.datasets.FashionMNIST):
    """torchvision's FashionMNIST reading the four raw idx files from `raw_dir` (any folder)."""

    def __init__(self, raw_dir, **kwargs):
        self._raw_dir = raw_dir
        super().__init__(raw_dir, download=False, **kwargs)

    @property
    def raw_folder(self):
        return self._raw_dir


def _fashion_mnist_raw_dir(folder):
    """A folder with the four idx files uncompressed: `folder` itself, or a cache where .gz files
    are unpacked."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if all(f in names for f in FMNIST_FILES):
        return folder
    if not all(f + ".gz" in names for f in FMNIST_FILES):
        return None
    key = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:10]
    out = os.path.join(cache_dir(), "fashion-mnist-" + key)
    os.makedirs(out, exist_ok=True)

    def unzip(name):
        def write(tmp):
            with gzip.open(os.path.join(folder, name + ".gz"), "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return write
    for f in FMNIST_FILES:
        if not os.path.exists(os.path.join(out, f)):
            _atomic_save(os.path.join(out, f), unzip(f))
    return out


def _fashion_mnist(root, split, transform, download):
    train = split == "train"
    roots = [root] if root else [DEBIAN_FASHION_MNIST, "./data"]
    # a folder of idx files (.gz or not), or torchvision's layout r/FashionMNIST/raw
    for r in roots:
        raw = _fashion_mnist_raw_dir(r)
        if raw:
            return IdxFashionMNIST(raw, train=train, transform=transform), raw
        if os.path.isdir(os.path.join(r, "FashionMNIST", "raw")):
            try:
                return torchvision.datasets.FashionMNIST(r, train=train, transform=transform), r
            except RuntimeError:
                pass  # incomplete: download below
    ds = torchvision.datasets.FashionMNIST(roots[-1], train=train, transform=transform,
                                           download=download)
    return ds, roots[-1]


class ImageFiles(torch.utils.data.Dataset):
    """Every readable image under `root`, recursively, without labels (target -1)."""

    def __init__(self, root, transform=None):
        check = ReadableImage()
        paths = (os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True) for f in fs)
        self.files = sorted(p for p in paths if check(p))
        self.transform = transform
        self.skipped = check.skipped

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        img, _ = _load_or_neighbour(self.files, index)
        return (self.transform(img) if self.transform else img), -1


class ReadableImage:
    """is_valid_file for torchvision's ImageFolder: an image extension and a header PIL can read;
    the rest is counted in `skipped`: a broken file costs one warning, not a crash mid-epoch."""

    def __init__(self):
        self.skipped = []

    def __call__(self, path):
        if not path.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS):
            return False
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 (parses the header)
            return True
        except Exception:  # any unreadable file: skip it, never crash
            self.skipped.append(path)
            return False


def _load_or_neighbour(paths, index):
    """(RGB image, its index): paths[index], or if that file is broken past its header, the next
    readable one."""
    for k in range(len(paths)):
        j = (index + k) % len(paths)
        try:
            return torchvision.datasets.folder.default_loader(paths[j]), j
        except Exception as e:  # a truncated file: warn and go on with the next image
            warnings.warn(f"skipping unreadable image {paths[j]}: {e}")
    raise DatasetError("no image in the folder could be read")


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder that skips unreadable files instead of crashing."""

    def __init__(self, root, transform=None):
        check = ReadableImage()
        super().__init__(root, transform=transform, is_valid_file=check)
        self.skipped, self.paths = check.skipped, [p for p, _ in self.samples]

    def __getitem__(self, index):
        img, j = _load_or_neighbour(self.paths, index)
        return (self.transform(img) if self.transform else img), self.targets[j]


def _folder(root, split, transform):
    if not root or not os.path.isdir(root):
        raise DatasetError(f"folder: {root!r} is not a folder; {DATASETS['folder']['get']}")
    if split == "unlabeled":
        sub = os.path.join(root, "train")
        ds = ImageFiles(sub if os.path.isdir(sub) else root, transform)
    else:
        names = ["train"] if split == "train" else ["test", "val"]
        found = [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
        if not found:
            raise DatasetError(f"folder: no {' or '.join(names)} sub-folder in {root}; evaluation "
                               f"needs class sub-folders in {root}/train and {root}/test "
                               f"(or {root}/val)")
        sub = found[0]
        try:
            ds = SafeImageFolder(sub, transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise DatasetError(f"folder: {sub} has no class sub-folders with readable images "
                               f"({e}); put each class's images in DIR/{split}/CLASS/") from None
    if ds.skipped:
        warnings.warn(f"folder: skipped {len(ds.skipped)} file(s) that are not readable images, "
                      f"e.g. {ds.skipped[0]}")
    if len(ds) == 0:
        raise DatasetError(f"folder: no readable image under {root}; {DATASETS['folder']['get']}")
    return ds


def get_dataset(name, root=None, split="train", transform=None, download=True):
    """The dataset `name` (a key of DATASETS), split 'train', 'test', 'unlabeled' (STL-10 and
    folder) or 'train+unlabeled' (STL-10). Images reach `transform` as RGB PIL images; labels are
    ints, -1 if none. root None: ./data (Fashion-MNIST: the Debian location first). Raises
    DatasetError, one line, if absent."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    transform = _with_rgb(transform)
    if name == "folder":
        return _folder(root, split, transform)
    valid = ("train", "test")
    if name == "stl10":
        valid += ("unlabeled", "train+unlabeled")
    if split not in valid:
        raise DatasetError(f"{name} has no split {split!r}: choose one of {', '.join(valid)}")
    where = root or "./data"
    try:
        if name == "stl10":
            return torchvision.datasets.STL10(where, split=split, transform=transform,
                                              download=download)
        if name in ("cifar10", "cifar100"):
            datasets = torchvision.datasets
            cifar = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            return cifar(where, train=split == "train", transform=transform, download=download)
        ds, _ = _fashion_mnist(root, split, transform, download)
        return ds
    except (RuntimeError, OSError, ValueError) as e:
        looked = os.path.abspath(where)
        if name == "fashion-mnist" and not root:
            looked = f"{DEBIAN_FASHION_MNIST} and ./data"
        reason = "download failed" if download else "download disabled"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"{name}: not found in {looked} ({reason}: {first}); to get it, "
                           f"{DATASETS[name]['get']}") from None


def labels(dataset):
    """All labels of a dataset built by get_dataset, as a LongTensor, without decoding any image."""
    for attr in ("targets", "labels"):
        if getattr(dataset, attr, None) is not None:
            return torch.as_tensor(getattr(dataset, attr), dtype=torch.long)
    if hasattr(dataset, "samples"):
        return torch.tensor([t for _, t in dataset.samples])
    return torch.full((len(dataset),), -1, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Resident data: the whole dataset as one uint8 tensor, batched by index without per-sample Python.

def _base(dataset):
    """(the underlying dataset, the indices of a Subset chain or None)"""
    idx = None
    while isinstance(dataset, torch.utils.data.Subset):
        sub = torch.as_tensor(list(dataset.indices))
        idx = sub if idx is None else sub[idx]
        dataset = dataset.dataset
    return dataset, idx


def uint8_images(dataset, size=None):
    """(images uint8 (N, C, H, W), labels (N,)) of a dataset from get_dataset. STL-10, CIFAR and
    Fashion-MNIST already hold their pixels in one array (C is 1 for Fashion-MNIST); a folder is
    decoded once, its short side resized to `size` and centre-cropped (evaluation's view), and
    cached in cache_dir() for the next run."""
    base, idx = _base(dataset)
    data = getattr(base, "data", None)
    if isinstance(base, torchvision.datasets.MNIST):
        images = base.data.unsqueeze(1)  # (N, 1, 28, 28)
    elif isinstance(base, torchvision.datasets.STL10):
        images = torch.from_numpy(data).contiguous()  # (N, 3, 96, 96) after torchvision's transpose
    elif isinstance(base, torchvision.datasets.CIFAR10):
        # (N, 32, 32, 3) -> (N, 3, 32, 32)
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    elif isinstance(base, (ImageFiles, SafeImageFolder)):
        images = _decoded_folder(base, size or DATASETS["folder"]["size"])
    else:
        raise TypeError(f"cannot hold {type(base).__name__} as one tensor")
    ys = labels(base)
    return (images, ys) if idx is None else (images[idx], ys[idx])


def whole_images(dataset, size=None):
    """(images uint8 (N, C, S, S), labels (N,), sizes (N, 2)) for pretraining's batched
    augmentation, which draws each crop box on the original (H, W) = sizes[i] and reads it from
    images[i]. STL-10, CIFAR and Fashion-MNIST: uint8_images at their own size. A folder: every
    image whole, resized to S = whole_side(size) without keeping its aspect, decoded once and cached
    in cache_dir(); DatasetError before any decoding if it would not fit in memory (check_fits)."""
    base, idx = _base(dataset)
    if not isinstance(base, (ImageFiles, SafeImageFolder)):
        images, ys = uint8_images(dataset)
        return images, ys, torch.tensor([images.shape[-2:]]).repeat(len(images), 1)  # (N, 2)
    size = size or DATASETS["folder"]["size"]
    check_fits(len(base), whole_side(size), available_memory())
    images, sizes = _decoded_folder(base, size, whole=True)
    ys = labels(base)
    return (images, ys, sizes) if idx is None else (images[idx], ys[idx], sizes[idx])


def whole_side(size):
    """Side of the square a folder image is stored in for views of `size`: ceil(1.25 size). A crop
    of 64% of the image or more is then read at or above the view's resolution and the median crop
    (about half the area, 0.71 of each side) enlarged only 1.13x, for 1.56x the memory of a
    size x size image."""
    return math.ceil(1.25 * size)


def available_memory():
    """Bytes this process may still allocate: MemAvailable (else the free pages), or less under a
    cgroup v2 memory limit (containers, Slurm); None if unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            # /proc/meminfo gives MemAvailable in kB
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                found.append(int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits(n, side, available):
    """TooLargeToHold (one line) if n images of 3 x side x side bytes need more than half the
    `available` bytes: the held tensor, plus on a GPU its pinned copy (pin_memory() copies), must
    leave room for the run. None: no check."""
    need = n * 3 * side * side
    if available is not None and need > available / 2:
        raise TooLargeToHold(f"folder: {n} images stored as {side}x{side} uint8 need "
                             f"{need / 2 ** 30:.2f} GiB, more than half of the "
                             f"{available / 2 ** 30:.2f} GiB of memory available")


def _decoded_folder(ds, size, whole=False):
    """A folder's images decoded once, cached in cache_dir(): uint8 (N, 3, size, size), each short
    side resized to `size` and centre-cropped; or whole: (uint8 (N, 3, S, S), each image resized
    whole to S = whole_side(size), its original (H, W) (N, 2))."""
    paths = ds.files if isinstance(ds, ImageFiles) else ds.paths
    side = whole_side(size) if whole else size
    # the centre crops keep their key from before (the same pixels); the whole squares their own
    tag = [size] + (["whole", side] if whole else [])
    files = [(p, os.path.getmtime(p)) for p in paths]
    key = hashlib.sha1(repr(tag + files).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"folder-{'whole-' if whole else ''}{key}.pt")
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        return (cached["images"], cached["sizes"]) if whole else cached
    v2 = torchvision.transforms.v2
    if whole:
        fit = [v2.Resize((side, side), antialias=True)]
    else:
        fit = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    tf = v2.Compose([v2.PILToTensor()] + fit)
    images = torch.empty(len(paths), 3, side, side, dtype=torch.uint8)
    sizes = torch.empty(len(paths), 2, dtype=torch.long)
    for i in range(len(paths)):
        img = _load_or_neighbour(paths, i)[0]  # a broken file's neighbour: its size goes with it
        images[i] = tf(img)  # (3, side, side)
        sizes[i] = torch.tensor([img.height, img.width])
    os.makedirs(cache_dir(), exist_ok=True)
    entry = dict(images=images, sizes=sizes) if whole else images
    _atomic_save(path, lambda tmp: torch.save(entry, tmp))
    return (images, sizes) if whole else images


def pin_before_copy(src, dst):
    """Whether a batch on device `src` is pinned before its copy to `dst`: only from the host to a
    GPU, where pinning lets the copy run without blocking (pin_memory() of a GPU tensor raises)."""
    return src.type == "cpu" and dst.type == "cuda"


class ResidentImages:
    """A dataset held as one uint8 tensor (N, C, H, W): on `device` when it fits in a third of the
    free device memory, else in pinned host memory (CUDA) or plain host memory (CPU). batch(idx)
    gathers by index. device: a torch.device with its index, as tensors report it: cuda:0, not
    cuda (harness.check_device resolves it)."""

    def __init__(self, images, labels, device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            images = images.to(self.device) if images.nbytes < free / 3 else images.pin_memory()
        self.images, self.labels = images, labels.to(images.device)

    def __len__(self):
        return len(self.images)

    def batch(self, idx):
        """(uint8 images (B, C, H, W) on the device, labels (B,)) for the LongTensor idx."""
        idx = idx.to(self.images.device)
        x, y = self.images[idx], self.labels[idx]
        if x.device != self.device:
            if pin_before_copy(x.device, self.device):
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y


# --------------------------------------------------------------------------------------------------
# Two-view batches for pretraining, reproducible wherever a run stops and resumes.

def mix_seed(*parts):
    """One 63-bit seed from several integers (seed, rank, epoch, step, ...)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2 ** 63 - 1)
    return h


class TwoViews(torch.utils.data.Dataset):
    """((view1, view2), label) per image through `transform` (returning two views); with
    `small_transform` ((view1, view2), (small crop 1, ...), label). The augmentation of image i in
    epoch e draws from a torch RNG seeded by (seed, e, i): the same whatever the workers, ranks or
    resumes."""

    def __init__(self, dataset, transform, seed, small_transform=None):
        self.dataset = dataset
        self.transform = transform
        self.small_transform = small_transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, i))
            views = self.transform(img)
            if self.small_transform is None:
                return views, label
            return views, self.small_transform(img), label  # drawn after the large views


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (shuffle, drop_last, set_epoch) starting an epoch after `skip` samples."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return self.num_samples - self.skip


class TwoViewBatches:
    """One rank's pretraining batches: (views (2n, 3, S, S) on `device`, labels (n,)), view 1 of
    image i at row i and view 2 at row n + i. Either batched, by `batch_augment(x, generator,
    sizes=...)` -> (2n, 3, S, S) (e.g. augment.BatchAugment) applied on the device to the dataset
    held as one uint8 tensor (whole_images: a folder's images whole, each crop box drawn on its
    original's size), its parameters drawn from a CPU generator seeded by (seed, rank, epoch, step);
    or per image, by `transform` (e.g. augment.SimCLRTransform) in DataLoader workers. Both walk the
    same ResumableSampler order: a resumed run sees what an uninterrupted one would.

    Multi-crop: with `small_crops` V > 0 and `small_augment` (batched, called with views=V) or
    `small_transform` (per image, returning V crops), the first item is the list [views,
    small (V n, 3, s, s)], small crop k of image i at row k n + i, drawn after the views (which stay
    those of a run without small crops)."""

    def __init__(self, dataset, per_rank, rank, world, seed, device, batch_augment=None,
                 image_size=None, transform=None, workers=0, worker_init_fn=None,
                 small_crops=0, small_augment=None, small_transform=None):
        self.per_rank = per_rank
        self.rank = rank
        self.seed = seed
        self.device = torch.device(device)
        self.sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // per_rank
        self.augment = batch_augment
        self.small_crops = small_crops
        self.small_augment = small_augment
        if batch_augment is not None:
            images, ys, self.sizes = whole_images(dataset, image_size)  # sizes (N, 2) on the host
            self.resident = ResidentImages(images, ys, self.device)
            self.gen = torch.Generator()  # parameters drawn on the CPU: the views of any device
        else:
            small = small_transform if small_crops else None
            self.dataset = TwoViews(dataset, transform, seed, small_transform=small)
            self.loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=per_rank, sampler=self.sampler, drop_last=True,
                num_workers=workers, pin_memory=self.device.type == "cuda",
                worker_init_fn=worker_init_fn)

    def steps(self, step, total_steps):
        """(step, epoch, (views, labels)) from `step` to total_steps across epochs, from mid-epoch
        on resume."""
        while step < total_steps:
            epoch, start = divmod(step, self.steps_per_epoch)
            n = min(self.steps_per_epoch - start, total_steps - step)
            for x, y in itertools.islice(self.epoch(epoch, start), n):
                yield step, epoch, (x, y)
                step += 1

    def epoch(self, epoch, start=0):
        """Yield the batches of steps start, start + 1, ... of `epoch`."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip = start * self.per_rank
        if self.augment is None:
            self.dataset.set_epoch(epoch)
            for (v1, v2), *small, y in self.loader:
                # each view from its pinned batch, then cat on the device: a cat on the host would
                # not be pinned
                v1 = v1.to(self.device, non_blocking=True)
                v2 = v2.to(self.device, non_blocking=True)
                views = torch.cat([v1, v2])  # (2n, 3, S, S)
                if small:  # V batches (n, 3, s, s) -> (V n, 3, s, s)
                    crops = [c.to(self.device, non_blocking=True) for c in small[0]]
                    views = [views, torch.cat(crops)]
                yield views, y.to(self.device, non_blocking=True)
            return
        order = torch.tensor(list(self.sampler))
        steps = len(order) // self.per_rank
        order = order[:steps * self.per_rank].view(steps, self.per_rank)  # (steps, n)
        # once per epoch, not a copy per step; to a GPU from pinned memory and without blocking: a
        # pageable copy would make the host wait for the GPU at every epoch's start
        on_device = order
        held_on = self.resident.images.device
        if held_on != order.device:
            if pin_before_copy(order.device, held_on):
                on_device = order.pin_memory()
            on_device = on_device.to(held_on, non_blocking=True)
        for k, (idx, host_idx) in enumerate(zip(on_device, order), start):
            x, y = self.resident.batch(idx)  # uint8 (n, C, S, S)
            sizes = self.sizes[host_idx]  # (n, 2): the originals' (H, W), where crops are drawn
            self.gen.manual_seed(mix_seed(self.seed, self.rank, epoch, k))
            views = self.augment(x, self.gen, sizes=sizes)  # (2n, 3, S, S): two draws per image
            if self.small_crops:  # (V n, 3, s, s), drawn after the views
                small = self.small_augment(x, self.gen, sizes=sizes, views=self.small_crops)
                views = [views, small]
            yield views, y
