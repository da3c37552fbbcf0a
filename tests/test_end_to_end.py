import json
import os
import time

import pytest
import torch

import eval_linear
import train
from conftest import write_cifar
from lars import LARS

TINY = ["--dataset", "cifar10", "--arch", "resnet18", "--width", "0.125", "--batch-size", "16",
        "--workers", "0", "--log-every", "1", "--amp", "off", "--no-download", "--no-aug-compile"]


def run_train(argv):
    args = train.get_args_parser().parse_args(argv)
    train.main(args)
    return args


@pytest.mark.parametrize("pipeline", ["batched", "per-image"])
def test_train_then_eval_then_resume(tmp_path, no_md5, capsys, pipeline):
    write_cifar(tmp_path / "data", n_train=40, n_test=20)
    out = str(tmp_path / "run")
    common = TINY + ["--data-dir", str(tmp_path / "data"), "--output-dir", out,
                     "--pipeline", pipeline]
    run_train(common + ["--max-steps", "2"])
    for f in ("last.pt", "metrics.jsonl", "curves.png", "augmentations.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["args"]["max_steps"] == 2
    assert {"model", "optimizer", "scaler", "epoch", "rng"} <= set(ckpt)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)

    capsys.readouterr()
    eval_linear.main(eval_linear.get_args_parser().parse_args(
        ["--ckpt", os.path.join(out, "last.pt"), "--max-train-samples", "30"]))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert {"top1", "top5", "ckpt", "dataset"} <= set(result) and result["dataset"] == "cifar10"
    assert (result["train_samples"] == 30 and result["test_samples"] == 20
            and 0 <= result["top1"] <= 100)
    with open(os.path.join(out, "eval_cifar10.json")) as f:
        assert json.load(f) == result

    # the same command with a larger budget continues from the stored step (automatic resume)
    run_train(common + ["--max-steps", "4", "--extend"])
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] == 4
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_random_init_baseline(tmp_path, no_md5, capsys):
    write_cifar(tmp_path / "data", n_train=20, n_test=10)
    out = str(tmp_path / "run")
    run_train(TINY + ["--data-dir", str(tmp_path / "data"), "--output-dir", out, "--max-steps", "1",
                      "--batch-size", "8"])
    capsys.readouterr()
    eval_linear.main(eval_linear.get_args_parser().parse_args(
        ["--ckpt", os.path.join(out, "last.pt"), "--random-init",
         "--output-dir", str(tmp_path / "ev")]))
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    random_row, = [r for r in result["results"] if r["encoder"] == "random"]
    # the reported number is that of the variant chosen on held-out training images, named in
    # the table
    assert result["random_top1"] == random_row["top1"] and 0 <= random_row["top1"] <= 100
    scores = random_row["variant_scores"]
    assert set(scores) == set(eval_linear.RANDOM_VARIANTS)
    assert all(scores[random_row["variant"]] >= s for s in scores.values())  # the best, by value
    assert any(f"random ({random_row['variant']})" in line for line in lines)
    assert os.path.exists(tmp_path / "ev" / "eval_cifar10.json")


def test_lr_schedule_is_warmup_from_zero_then_cosine():
    """The official schedule: step / warmup x peak during warmup (0 at step 0), then cosine from the
    peak."""
    lr = [train.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lr[0] == 0.0 and lr[1] == pytest.approx(0.1) and lr[9] == pytest.approx(0.9)
    assert lr[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:])) and lr[-1] < 1e-3
    assert train.lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)


def test_lars_excludes_biases_and_bn_and_scales_by_trust_ratio():
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))
    b = torch.nn.Parameter(torch.ones(4))
    opt = LARS([w, b], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.001)
    w.grad, b.grad = torch.full((4, 4), 0.5), torch.full((4,), 0.5)
    opt.step()
    # trust ratio 0.001 * ||w|| / ||g|| = 0.001 * 8 / 2: the step is 0.004 * g
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 2.0 - 0.004 * 0.5))
    torch.testing.assert_close(b.detach(), torch.full((4,), 0.5))  # plain SGD for biases/BN


@pytest.mark.parametrize("stem_stride", ["1", "2"])
def test_readme_snippets_load_a_checkpoint(tmp_path, no_md5, monkeypatch, stem_stride):
    """The two 'Use the encoder elsewhere' snippets of the README, run as written on a train.py
    checkpoint: both give the same features."""
    import re
    write_cifar(tmp_path / "data", n_train=20, n_test=10)
    out = tmp_path / "runs" / "stl10"
    run_train(TINY + ["--width", "1.0", "--data-dir", str(tmp_path / "data"),
                      "--output-dir", str(out), "--max-steps", "1", "--proj-dim", "16",
                      "--stem-stride", stem_stride])
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    section = readme[readme.index("## Use the encoder elsewhere"):]
    first, second = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    scope = {"images": torch.randn(2, 3, 32, 32)}
    monkeypatch.chdir(tmp_path)  # the snippet reads runs/stl10/last.pt
    exec(first, scope)
    assert scope["features"].shape == (2, 512)
    exec(second, scope)
    torch.testing.assert_close(scope["h"], scope["features"])


def test_logged_img_s_is_the_rate_of_each_window(tmp_path, no_md5, monkeypatch):
    """Each metrics line's img/s counts the steps since the previous line only: with steps that get
    slower, a cumulative rate would stay above the last window's."""
    write_cifar(tmp_path / "data", n_train=40, n_test=20)
    real, calls = train.train_step, []

    def slower(*a, **k):
        calls.append(1)
        time.sleep(0.1 * len(calls))  # step k takes 0.1 k s more
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", slower)
    out = tmp_path / "run"
    run_train(TINY + ["--data-dir", str(tmp_path / "data"), "--output-dir", str(out),
                      "--max-steps", "4", "--epochs", "2"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "img_s" in line]
    # the 4th step alone: 16 images in >= 0.4 s
    assert len(rows) == 4 and rows[-1]["img_s"] < 16 / 0.4


def test_label_free_monitors_are_logged_without_a_host_read_per_step(tmp_path, no_md5, monkeypatch):
    """Every metrics row holds the contrastive top-1 (%) and the spread of z; train_step itself
    calls no .item() or .tolist() (the log line's one read carries the monitors), and curves.png is
    drawn."""
    write_cifar(tmp_path / "data", n_train=40, n_test=20)
    reads = []
    inside = []
    for name in ("item", "tolist"):
        real_read = getattr(torch.Tensor, name)

        def read(self, *a, _real=real_read, **k):
            reads.append(bool(inside))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, read)
    real_step = train.train_step

    def step(*a, **k):
        inside.append(1)
        try:
            return real_step(*a, **k)
        finally:
            inside.pop()
    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "run"
    run_train(TINY + ["--data-dir", str(tmp_path / "data"), "--output-dir", str(out),
                      "--max-steps", "4", "--log-every", "2"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0 <= r["contrastive_top1"] <= 100 and r["spread"] > 0 for r in rows)
    assert reads and not any(reads)  # reads happen, at log lines, none inside a step
    assert (out / "curves.png").stat().st_size > 0


def test_compile_that_fails_at_the_first_step_falls_back_to_eager(tmp_path, no_md5, monkeypatch,
                                                                  capsys):
    """A GPU whose compiler fails (inductor raising at the first call): one warning, then the run
    trains eagerly."""
    write_cifar(tmp_path / "data", n_train=40, n_test=20)

    class Broken:
        def __call__(self, *a, **k):
            raise RuntimeError("inductor: no kernel for this GPU")
    monkeypatch.setattr(train.torch, "compile", lambda net: Broken())
    out = tmp_path / "run"
    run_train(TINY + ["--data-dir", str(tmp_path / "data"), "--output-dir", str(out),
                      "--max-steps", "2", "--compile"])
    captured = capsys.readouterr()
    assert ("--compile failed at the first step (RuntimeError: inductor"
            in captured.out + captured.err)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    summary = json.load(open(out / "summary.json"))
    assert (summary["steps"] == 2 and summary["img_s_end_to_end"] > 0
            and 0 <= summary["save_share"] <= 1)


def test_preview_of_large_views_is_drawn_at_512_px(tmp_path, no_md5):
    """Views of 4096 px would make a 12k x 33k px picture after minutes of CPU: the preview shows
    them at 512."""
    from PIL import Image
    write_cifar(tmp_path / "data", n_train=20, n_test=10)
    out = tmp_path / "run"
    run_train(TINY + ["--data-dir", str(tmp_path / "data"), "--output-dir", str(out),
                      "--image-size", "600", "--preview"])
    width, height = Image.open(out / "augmentations.png").size
    # 3 rows of 8 tiles, 2 px grid
    assert height == 3 * (512 + 2) + 2 and width == 8 * (512 + 2) + 2
