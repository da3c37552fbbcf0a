import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
from conftest import ROOT, write_cifar, write_folder, write_idx, write_stl10
from data import DatasetError, get_dataset, labels


def check(ds, n, size, classes=10):
    assert len(ds) == n
    img, y = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (size, size)
    assert isinstance(y, int)
    ys = labels(ds)
    assert ys.shape == (n,) and ys.dtype == torch.long
    if classes:
        assert len(ds.classes) == classes and ys.min() >= 0 and ys.max() < classes


def test_stl10_every_split(tmp_path, no_md5):
    write_stl10(tmp_path, n_train=20, n_test=10, n_unlabeled=30)
    check(get_dataset("stl10", tmp_path, "train", download=False), 20, 96)
    check(get_dataset("stl10", tmp_path, "test", download=False), 10, 96)
    unl = get_dataset("stl10", tmp_path, "unlabeled", download=False)
    assert len(unl) == 30 and (labels(unl) == -1).all()
    both = get_dataset("stl10", tmp_path, "train+unlabeled", download=False)
    assert len(both) == 50 and (labels(both)[20:] == -1).all() and (labels(both)[:20] >= 0).all()


def test_stl10_pixels_read_back(tmp_path, no_md5):
    write_stl10(tmp_path, n_train=10, n_test=10, n_unlabeled=10)
    import numpy as np
    x = np.fromfile(tmp_path / "stl10_binary" / "train_X.bin",
                    dtype=np.uint8).reshape(-1, 3, 96, 96)
    img, _ = get_dataset("stl10", tmp_path, "train", download=False)[3]
    assert np.array_equal(np.asarray(img), x[3].transpose(2, 1, 0))  # column-major on disk


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar(tmp_path, no_md5, hundred):
    write_cifar(tmp_path, n_train=60, n_test=20, hundred=hundred)
    name = "cifar100" if hundred else "cifar10"
    check(get_dataset(name, tmp_path, "train", download=False), 60, 32, 100 if hundred else 10)
    check(get_dataset(name, tmp_path, "test", download=False), 20, 32, 100 if hundred else 10)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path, gz):
    write_idx(tmp_path / "fm", n_train=30, n_test=10, gz=gz)
    train = get_dataset("fashion-mnist", str(tmp_path / "fm"), "train", download=False)
    check(train, 30, 28)
    check(get_dataset("fashion-mnist", str(tmp_path / "fm"), "test", download=False), 10, 28)
    r, g, b = train[0][0].split()
    assert r.tobytes() == g.tobytes() == b.tobytes()  # grayscale repeated to 3 channels
    assert isinstance(train, __import__("torchvision").datasets.FashionMNIST)


def test_fashion_mnist_tries_the_debian_folder_first(tmp_path, monkeypatch):
    write_idx(tmp_path / "debian", n_train=12, n_test=4)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    assert len(get_dataset("fashion-mnist", None, "train", download=False)) == 12


def test_folder_pretraining_and_evaluation(tmp_path):
    write_folder(tmp_path / "imgs", per_class=4, size=40)
    with pytest.warns(UserWarning, match="skipped 1 file"):
        pre = get_dataset("folder", str(tmp_path / "imgs"), "unlabeled")
    assert len(pre) == 8 and (labels(pre) == -1).all()  # DIR/train only
    with pytest.warns(UserWarning, match="skipped 1 file"):
        train = get_dataset("folder", str(tmp_path / "imgs"), "train")
    check(train, 8, 40, classes=2)
    modes = {Image.open(p).mode for p in train.paths}
    assert {"RGBA", "P", "L"} <= modes and all(train[i][0].mode == "RGB" for i in range(len(train)))
    with pytest.warns(UserWarning):
        check(get_dataset("folder", str(tmp_path / "imgs"), "test"), 8, 40, classes=2)


def test_folder_without_train_uses_every_image_below(tmp_path):
    write_folder(tmp_path / "flat", per_class=3, splits=("a", "b"))
    with pytest.warns(UserWarning, match="skipped 2 file"):
        assert len(get_dataset("folder", str(tmp_path / "flat"), "unlabeled")) == 12


def test_folder_survives_a_file_that_breaks_after_its_header(tmp_path):
    write_folder(tmp_path / "imgs", per_class=2, splits=("train",))
    path = tmp_path / "imgs" / "train" / "cat" / "0.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixels cut
    with pytest.warns(UserWarning):
        ds = get_dataset("folder", str(tmp_path / "imgs"), "unlabeled")
        imgs = [ds[i][0] for i in range(len(ds))]
    assert len(imgs) == 4 and all(i.mode == "RGB" for i in imgs)


def test_folder_errors(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no readable image"):
        get_dataset("folder", str(tmp_path / "empty"), "unlabeled")
    with pytest.raises(DatasetError, match="not a folder"):
        get_dataset("folder", str(tmp_path / "nope"), "unlabeled")
    with pytest.raises(DatasetError, match="no test or val"):
        get_dataset("folder", str(tmp_path / "empty"), "test")


@pytest.mark.parametrize("name", ["stl10", "cifar10", "cifar100", "fashion-mnist"])
def test_missing_dataset_is_one_line(tmp_path, monkeypatch, name):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "none"))
    with pytest.raises(DatasetError) as e:
        get_dataset(name, str(tmp_path / "absent"), "train", download=False)
    msg = str(e.value)
    assert ("\n" not in msg and msg.startswith(name) and str(tmp_path / "absent") in msg
            and "to get it" in msg)


def test_train_py_without_stl10_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "stl10",
                        "--batch-size", "512", "--data-dir", str(tmp_path / "nothing"),
                        "--no-download"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "stl10" in r.stderr and "stl10_binary.tar.gz" in r.stderr


def assert_tensor_matches_pil(ds):
    images, ys = data.uint8_images(ds)
    assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(ds)
    for i in (0, len(ds) - 1):
        img, y = ds[i]
        x = torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1)  # (3, H, W)
        assert torch.equal(images[i].expand_as(x), x) and ys[i] == y


def test_uint8_images_hold_the_loaders_pixels(tmp_path, no_md5):
    write_stl10(tmp_path / "s", n_train=4, n_test=3, n_unlabeled=5)
    write_cifar(tmp_path / "c", n_train=10, n_test=5)
    write_idx(tmp_path / "f", n_train=7, n_test=3)
    assert_tensor_matches_pil(get_dataset("stl10", tmp_path / "s", "train+unlabeled",
                                          download=False))
    assert_tensor_matches_pil(get_dataset("cifar10", tmp_path / "c", "test", download=False))
    fm = get_dataset("fashion-mnist", str(tmp_path / "f"), "train", download=False)
    assert data.uint8_images(fm)[0].shape == (7, 1, 28, 28)  # kept as one channel
    assert_tensor_matches_pil(fm)
    sub = torch.utils.data.Subset(fm, [4, 1])
    assert torch.equal(data.uint8_images(sub)[0], data.uint8_images(fm)[0][[4, 1]])


def test_folder_is_decoded_once_and_cached(tmp_path):
    write_folder(tmp_path / "imgs", per_class=3, size=40)
    with pytest.warns(UserWarning):
        ds = get_dataset("folder", str(tmp_path / "imgs"), "unlabeled")
    images, ys = data.uint8_images(ds, size=32)
    assert images.shape == (6, 3, 32, 32) and (ys == -1).all()
    cached = list((tmp_path / "cache" / "simclr").glob("folder-*.pt"))
    assert len(cached) == 1
    again, _ = data.uint8_images(ds, size=32)
    assert torch.equal(images, again)


def test_resident_images_batch_by_index():
    images = torch.arange(5 * 2 * 4, dtype=torch.uint8).view(5, 2, 2, 2)
    r = data.ResidentImages(images, torch.arange(5), "cpu")
    x, y = r.batch(torch.tensor([3, 0]))
    assert torch.equal(x, images[[3, 0]]) and y.tolist() == [3, 0]
