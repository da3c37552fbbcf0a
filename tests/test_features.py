"""eval_linear.py --save-features: the frozen features of every split, in the order of the dataset,
reload and reproduce the linear probe; a folder without labels gets its features too."""

import numpy as np
import pytest
import torch

import eval_linear
import harness
import train
from conftest import write_folder, write_idx

TINY = ["--dataset", "fashion-mnist", "--arch", "resnet18", "--width", "0.125",
        "--batch-size", "16", "--amp", "off", "--no-download", "--no-aug-compile",
        "--log-every", "1", "--max-steps", "2"]


def evaluate(argv):
    return eval_linear.main(harness.Parser(parents=[eval_linear.get_args_parser()]).parse_args(
        argv))


@pytest.mark.parametrize("eval_on", ["test", "val"])
def test_saved_features_reproduce_the_linear_probe(tmp_path, capsys, eval_on):
    data = str(write_idx(tmp_path / "fm", n_train=200, n_test=60))
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(TINY + ["--data-dir", data,
                                                          "--output-dir", str(out)]))
    capsys.readouterr()
    feats = tmp_path / "features"
    summary = evaluate(["--ckpt", str(out / "last.pt"), "--pixels", "--save-features", str(feats),
                        "--eval-on", eval_on, "--val-fraction", "0.2", "--neighbours", "0",
                        "--amp", "off"])
    split = "test" if eval_on == "test" else "val"
    for encoder in ("simclr", "pixels"):
        train_file = np.load(feats / f"{encoder}_train.npz")
        held_file = np.load(feats / f"{encoder}_{split}.npz")
        xtr = torch.from_numpy(train_file["features"])
        ytr = torch.from_numpy(train_file["labels"])
        xte = torch.from_numpy(held_file["features"])
        yte = torch.from_numpy(held_file["labels"])
        assert xtr.dtype == torch.float32 and len(xtr) == len(ytr)
        # in the order of the dataset: the indices rise, and the labels are the split's own
        assert (np.diff(train_file["index"]) > 0).all() and (np.diff(held_file["index"]) > 0).all()
        if eval_on == "test":
            assert held_file["index"].tolist() == list(range(60))
            assert (held_file["labels"] == np.arange(60) % 10).all()  # conftest's labels: i % 10
        else:
            assert len(set(train_file["index"]) & set(held_file["index"])) == 0
            assert len(xtr) + len(xte) == 200
        assert (train_file["labels"] == train_file["index"] % 10).all()
        # the probe of eval_linear.py on the reloaded features: the same numbers, the same fit;
        # within 0.1 points (the same float32 L-BFGS on bit-identical inputs gives equal logits)
        grid = eval_linear.get_args_parser().parse_args([]).weight_decay
        logits, _ = eval_linear.linear_probe(xtr, ytr, xte, 10, grid, seed=0)
        top1 = (logits.argmax(1) == yte).float().mean().item() * 100
        reported = summary[f"{encoder}_top1"]
        assert abs(top1 - reported) <= 0.1, (encoder, top1, reported)
        assert top1 > 30  # the classes set the brightness: far above chance (10%)


def test_a_folder_without_labels_gets_its_features(tmp_path, capsys):
    photos = write_folder(tmp_path / "photos", per_class=3, size=40, splits=("train",))
    data = str(write_idx(tmp_path / "fm", n_train=32, n_test=8))
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(TINY + ["--data-dir", data,
                                                          "--output-dir", str(out)]))
    unlabelled = photos / "train"  # class folders, but no train/test inside: no labels
    feats = tmp_path / "features"
    evaluate(["--ckpt", str(out / "last.pt"), "--dataset", "folder", "--data-dir",
              str(unlabelled), "--image-size", "28", "--pixels", "--save-features", str(feats)])
    simclr = np.load(feats / "simclr_unlabeled.npz")
    pixels = np.load(feats / "pixels_unlabeled.npz")
    # 6 readable images (the broken one skipped), sorted by path
    assert simclr["features"].shape == (6, 64) and pixels["features"].shape == (6, 3 * 28 * 28)
    assert (simclr["labels"] == -1).all() and list(simclr["paths"]) == sorted(simclr["paths"])
    assert not (out / "eval_folder.json").exists()  # nothing evaluated without labels
