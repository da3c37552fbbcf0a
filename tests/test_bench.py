"""bench.py runs end to end at a tiny size and writes every number it promises."""
import json

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


def test_bench_runs_and_writes_its_keys(tmp_path):
    res = run_bench(tmp_path / "bench.json")
    assert KEYS <= set(res), KEYS - set(res)
    for key in ("aug_batched_img_s", "aug_per_image_img_s", "model_only_img_s", "step_img_s",
                "gflop_per_view"):
        assert res[key] > 0, key
    assert set(res["breakdown_ms"]) == {"data", "augment", "model", "full_step"}


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
