"""CUDA-only checks (`pytest -m cuda`, part of `make gpu-check`); skipped where torch finds no
GPU."""
import json
import os

import pytest
import torch

from data import get_dataset
import harness
import train
from conftest import write_idx, batch_augment

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
TINY = ["--dataset", "fashion-mnist", "--arch", "resnet18", "--width", "0.25", "--batch-size", "64",
        "--no-download", "--log-every", "5", "--device", "cuda"]


def run(argv):
    return train.main(harness.Parser(parents=[train.get_args_parser()]).parse_args(argv))


@pytest.fixture
def fm(tmp_path):
    return str(write_idx(tmp_path / "fm", n_train=256, n_test=64))


def test_batched_augmentation_on_cuda_equals_the_cpu(monkeypatch):
    """The same parameters (drawn on the CPU) give the same views on both devices. TF32 off: the
    blur's conv would round its inputs to 10 mantissa bits (1e-3). Left: float32 ops in another
    order or fused (FMA) on the GPU, ~10 roundings of values <= 1 before normalising by
    std 0.25 -> a few 1e-6; atol 1e-4 leaves room for grid_sample's bilinear weights, computed from
    the coordinates with their own rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    aug = batch_augment(32, blur_p=0.5, rotate_p=0.3)
    x = torch.randint(0, 256, (64, 3, 40, 40), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    params = aug.sample_params(64, 40, 40, torch.Generator().manual_seed(1))
    cpu = aug.apply(x, params)
    gpu = aug.to("cuda").apply(x.cuda(), params).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_short_cuda_run_in_each_amp_dtype(fm, tmp_path, amp):
    out = tmp_path / amp
    run(TINY + ["--data-dir", fm, "--output-dir", str(out), "--max-steps", "6", "--amp", amp])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows and all(0 < r["loss"] < 20 for r in rows if "loss" in r)
    if amp == "fp16":
        assert torch.load(out / "last.pt", weights_only=True)["scaler"]["scale"] > 0


def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu(fm, tmp_path):
    out = str(tmp_path / "run")
    run(TINY + ["--data-dir", fm, "--output-dir", out, "--max-steps", "2"])
    cpu = [a if a != "cuda" else "cpu" for a in TINY]
    run(cpu + ["--data-dir", fm, "--output-dir", out, "--max-steps", "3", "--extend",
               "--no-aug-compile"])
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] == 3


def test_out_of_memory_is_one_line(fm, tmp_path, capsys):
    """8192 px views of 64 images: 103 GB for the float32 views alone, more than any GPU's 80-141 GB
    once the first conv's activations join them. The augmentation preview shows such views at 512 px
    (seconds of CPU, not the minutes of a 12k x 33k px picture)."""
    with pytest.raises(SystemExit) as e:
        run(TINY + ["--data-dir", fm, "--output-dir", str(tmp_path / "oom"), "--image-size", "8192",
                    "--max-steps", "1"])
    torch.cuda.empty_cache()  # the tests after this one start from a clean cache
    err = capsys.readouterr().err
    assert (e.value.code == 2 and err.count("\n") == 1 and "out of memory" in err
            and "smaller --batch-size" in err)


def test_thirty_training_steps_never_sync_with_the_host(fm, tmp_path):
    """Data, batched augmentation and the optimiser step, outside the log interval: no host-device
    sync."""
    args = train.resolve_args(train.get_args_parser().parse_args(
        TINY + ["--data-dir", fm, "--output-dir", str(tmp_path)]))
    device = harness.check_device("cuda")
    base = get_dataset(args.dataset, args.data_dir, args.split, download=False)
    batches = train.two_view_batches(base, args, 0, 1, device).steps(0, 40)
    model = train.build_model(args, 1, device)
    optimizer = train.build_optimizer(model, args, 0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for _ in range(5):  # warm-up: cudnn.benchmark, allocator, lazy init
        _, _, (x, y) = next(batches)
        train.train_step(model, x, optimizer, scaler, torch.bfloat16, args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(30):
            _, _, (x, y) = next(batches)
            loss, _, _ = train.train_step(model, x, optimizer, scaler, torch.bfloat16, args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
