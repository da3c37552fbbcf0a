"""bench.py runs end to end at a tiny size and writes every number it promises."""
import json

import pytest

import bench

KEYS = {"date", "device", "torch", "arch", "width", "stem_stride", "image_size", "batch_size",
        "amp", "aug_batched_img_s", "aug_batched_eager_img_s", "aug_per_image_img_s", "aug_speedup",
        "loss_ms", "model_only_img_s", "step_img_s", "step_over_model", "breakdown_ms",
        "gflop_per_view", "model_tflop_s", "step_tflop_s"}


def run_bench(out, *extra):
    """bench.py at a tiny size (a few images, one repetition) -> the bench.json it wrote."""
    args = bench.get_args_parser().parse_args(
        ["--width", "0.125", "--image-size", "32", "--batch-size", "4", "--aug-batch", "8",
         "--steps", "1", "--reps", "1", "--workers", "0", "--no-aug-compile",
         "--out", str(out), *extra])
    bench.main(args)
    return json.loads(out.read_text())


def resnet18_flop_per_view(size, widths, proj_dim, stem_stride=1):
    """Forward + backward FLOP (2 per multiply-add) of one image through train.py's small-stem
    ResNet-18 (3x3 stem conv, no max-pool; widths: the channels of its four stages) and its 2-layer
    head, counted by hand: each conv out_side^2 * c_in * c_out * k^2 multiply-adds, each linear
    in * out. The backward computes the input's and the weights' gradients, each as many FLOP as the
    forward, but the stem's input needs no gradient."""
    def conv(side, c_in, c_out, k=3):
        return side * side * c_in * c_out * k * k

    side = size // stem_stride
    stem = conv(side, 3, widths[0])
    macs = stem + 4 * conv(side, widths[0], widths[0])  # layer1: two blocks of two convs
    for c_in, c_out in zip(widths, widths[1:]):  # layers 2-4: stride 2, a 1x1 downsample
        side //= 2
        macs += conv(side, c_in, c_out) + 3 * conv(side, c_out, c_out) + conv(side, c_in, c_out, 1)
    feat = widths[-1]
    macs += feat * feat + feat * proj_dim  # the head: feat -> feat -> proj_dim, no biases
    return 3 * 2 * macs - 2 * stem


def test_bench_runs_and_writes_its_keys(tmp_path):
    """Every key, and the numbers tied to each other and to a FLOP count by hand, so that a wrong
    formula fails whatever the timings."""
    res = run_bench(tmp_path / "bench.json")
    assert KEYS <= set(res), KEYS - set(res)
    for key in ("aug_batched_img_s", "aug_per_image_img_s", "model_only_img_s", "step_img_s",
                "gflop_per_view"):
        assert res[key] > 0, key
    assert set(res["breakdown_ms"]) == {"data", "augment", "model", "full_step"}
    # resnet18 x0.125 at 32 px (small stem, stride 1): stages of 8, 16, 32, 64 channels, z of 128;
    # 52,862,976 FLOP: FlopCounterMode counts integers, exact
    assert res["gflop_per_view"] * 1e9 == pytest.approx(
        resnet18_flop_per_view(32, [8, 16, 32, 64], 128), rel=1e-12)
    # each derived number from the stored ones: float64 products and quotients of a few values,
    # each rounded once (eps 1.1e-16), and JSON keeps every float64 exactly: 1e-12 relative
    batch = res["batch_size"]

    def same(a, b):
        assert a == pytest.approx(b, rel=1e-12), (a, b)
    same(res["step_over_model"], res["step_img_s"] / res["model_only_img_s"])
    same(res["aug_speedup"], res["aug_batched_img_s"] / res["aug_per_image_img_s"])
    # two views per image: the step's FLOP per image are twice a view's
    same(res["model_tflop_s"], res["gflop_per_view"] * 2 * res["model_only_img_s"] / 1e3)
    same(res["step_tflop_s"], res["gflop_per_view"] * 2 * res["step_img_s"] / 1e3)
    same(res["breakdown_ms"]["full_step"], 1e3 * batch / res["step_img_s"])
    same(res["breakdown_ms"]["model"], 1e3 * batch / res["model_only_img_s"])
    assert batch == 4 and res["image_size"] == 32 and res["width"] == 0.125


def test_bench_stem_stride_reaches_the_model(tmp_path):
    """--stem-stride 2 (the CPU demo's stem) is the model that is timed: a quarter of the pixels
    after the stem, so fewer FLOP per view than stride 1 (counted by FlopCounterMode, exact
    integers)."""
    flop = {}
    for stride in (1, 2):
        res = run_bench(tmp_path / f"bench{stride}.json", "--stem-stride", str(stride))
        assert res["stem_stride"] == stride
        flop[stride] = res["gflop_per_view"]
    assert flop[2] < 0.5 * flop[1], flop
