"""Tiny datasets written in each dataset's real on-disk format, so that torchvision's own loaders
read them."""
import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import augment  # noqa: E402 (after the path above)


def batch_augment(size, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD, compile=False,
                  **recipe):
    """augment.BatchAugment from the flat keywords the tests write: ImageSpec(size, mean, std),
    Recipe(**recipe)."""
    return augment.BatchAugment(augment.ImageSpec(size, mean, std), augment.Recipe(**recipe),
                                compile=compile)


def simclr_transform(size, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD, **recipe):
    """augment.SimCLRTransform from flat keywords, as batch_augment."""
    return augment.SimCLRTransform(augment.ImageSpec(size, mean, std), augment.Recipe(**recipe))


def colour_op(kind):
    """BatchAugment's brightness (kind 0), contrast (1) or saturation (2) alone, x (B, C, H, W) and
    factors f (B,): the batched colour map of one op, to compare with torchvision's."""
    def adjust(x, f):
        w = augment.luma_weights(x.shape[1], x.device)
        kinds = torch.full_like(f, kind, dtype=torch.long)
        return augment.color_affine(x, *augment.color_maps(kinds, f, w), w)
    return adjust


def resized_crop(x, boxes, size, flip=None, rot=None):
    """BatchAugment's crop, resize, flip and rotation alone, in one grid_sample (bilinear, no
    antialiasing)."""
    gx, gy = augment.crop_coords(boxes, size, x.shape[2], x.shape[3], flip)
    grid = augment.sample_grid(gx, gy, rot)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _images(n, size, channels=3, seed=0):
    """Random uint8 images whose class (i % 10) sets the mean brightness, so a probe has something
    to find."""
    rng = np.random.default_rng(seed)
    base = (np.arange(n) % 10 * 20 + 30).astype(np.int16)[:, None, None, None]
    x = base + rng.integers(-30, 30, size=(n, channels, size, size))
    return np.clip(x, 0, 255).astype(np.uint8), (np.arange(n) % 10).astype(np.uint8)


def write_cifar(root, n_train=60, n_test=20, hundred=False):
    """cifar-10-batches-py/ (or cifar-100-python/): latin1 pickles of 'data' (N, 3072) and
    labels."""
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    key = "fine_labels" if hundred else "labels"
    xtr, ytr = _images(n_train, 32)
    xte, yte = _images(n_test, 32, seed=1)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    for i, name in enumerate(names):  # split the train images over the batch files
        part = slice(i * n_train // len(names), (i + 1) * n_train // len(names))
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": xtr[part].reshape(-1, 3072), key: ytr[part].tolist()}, f)
    with open(os.path.join(folder, "test" if hundred else "test_batch"), "wb") as f:
        pickle.dump({"data": xte.reshape(-1, 3072), key: yte.tolist()}, f)
    meta_key = "fine_label_names" if hundred else "label_names"
    with open(os.path.join(folder, "meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(100 if hundred else 10)]}, f)
    return root


def write_stl10(root, n_train=20, n_test=20, n_unlabeled=30):
    """stl10_binary/: uint8 images (N, 3, 96, 96) stored column-major,
    labels 1..10, class_names.txt."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1),
                           ("unlabeled", n_unlabeled, 2)):
        x, y = _images(n, 96, seed=seed)
        x.transpose(0, 1, 3, 2).tofile(os.path.join(folder, f"{split}_X.bin"))
        if split != "unlabeled":
            (y + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(f"class{i}" for i in range(10)) + "\n")
    return root


def write_idx(folder, n_train=60, n_test=20, gz=True):
    """The four Fashion-MNIST idx files (big-endian magic 2051/2049 and sizes), .gz or raw."""
    os.makedirs(folder, exist_ok=True)
    opener = gzip.open if gz else open
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = _images(n, 28, channels=1, seed=seed)
        with opener(os.path.join(folder, f"{prefix}-images-idx3-ubyte" + (".gz" if gz else "")),
                    "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        with opener(os.path.join(folder, f"{prefix}-labels-idx1-ubyte" + (".gz" if gz else "")),
                    "wb") as f:
            f.write(struct.pack(">II", 2049, n) + y.tobytes())
    return folder


def write_folder(root, per_class=6, size=40, classes=("cat", "dog"), splits=("train", "test")):
    """DIR/split/class/*.png in several modes (RGB, L, RGBA, P), plus one corrupt file per split."""
    modes = ["RGB", "L", "RGBA", "P"]
    for split in splits:
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            x, _ = _images(per_class, size, seed=c)
            for i in range(per_class):
                img = Image.fromarray(x[i].transpose(1, 2, 0)).convert(modes[i % len(modes)])
                img.save(os.path.join(root, split, name, f"{i}.png"))
        with open(os.path.join(root, split, classes[0], "broken.jpg"), "wb") as f:
            f.write(b"this is not a jpeg")
    return root


def one_line_exit_2(capsys, fn):
    """fn() exits with code 2 and one line on stderr, "error: ...", never a traceback.
    -> that line"""
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the md5 of the real STL-10/CIFAR files; the tiny ones only need to
    exist."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10
    for mod in (cifar, stl10):
        monkeypatch.setattr(mod, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own cache, and never touches the network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "cuda: needs a CUDA GPU (make gpu-check runs them; skipped elsewhere)")
