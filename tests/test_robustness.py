"""Never lose a run: exact resume after a kill or a signal, safe checkpoint loading, one-line
errors."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval_linear
import harness
import train
from conftest import ROOT, one_line_exit_2, write_idx

TINY = ["--dataset", "fashion-mnist", "--arch", "resnet18", "--width", "0.25", "--batch-size", "16",
        "--amp", "off", "--no-download", "--no-aug-compile", "--log-every", "5", "--seed", "3"]


def run_cmd(argv):
    return [sys.executable, os.path.join(ROOT, "train.py"), *argv]


def same_checkpoints(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)


@pytest.mark.parametrize("how,pipeline,cpu_defaults", [
    ("SIGKILL", "batched", False), ("SIGTERM", "batched", False), ("SIGKILL", "per-image", False),
    ("SIGKILL", "batched", True)])
def test_killed_run_resumes_bit_identical(tmp_path, how, pipeline, cpu_defaults):
    """Slow-ish (three training processes). Reference run, then the same command killed part-way
    (after its first checkpoint, mid-epoch) and run again: the final weights and optimiser state are
    bit-identical. cpu_defaults: the CPU's defaults, bf16 autocast and the torch.compile'd batched
    augmentation (no --amp off, no --no-aug-compile); slower still (20-50 s: each of the three
    processes compiles the augmentation, ~10 s on 2 cores, or loads it from inductor's cache, and
    bf16 runs slower than float32 on CPUs without native bf16). Where torch.compile fails, the
    augmentation falls back eagerly with a warning, in every process alike, and the test still
    holds."""
    write_idx(tmp_path / "data", n_train=80, n_test=10)  # 5 steps per epoch
    tiny = TINY
    if cpu_defaults:
        tiny = [a for a in TINY if a != "--no-aug-compile"]
        i = tiny.index("--amp")
        del tiny[i:i + 2]
    args = tiny + ["--data-dir", str(tmp_path / "data"), "--epochs", "6", "--warmup-epochs", "1",
                   "--save-every", "2", "--pipeline", pipeline, "--workers", "2"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    ref = subprocess.run(run_cmd(args + ["--output-dir", str(tmp_path / "ref")]),
                         capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "run"
    cmd = run_cmd(args + ["--output-dir", str(out)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(getattr(signal, how))
    stdout, stderr = proc.communicate(timeout=120)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:  # finishes the step, saves, exits 0 with how to resume
        assert proc.returncode == 0, stderr[-2000:]
        assert "stopped by SIGTERM" in stdout and "Resume with the same command" in stdout
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 0 < step < 30
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'} at step {step}" in again.stdout
    same_checkpoints(tmp_path / "ref" / "last.pt", out / "last.pt")
    if cpu_defaults:  # the run took the defaults: bf16 and the compiled augmentation
        saved = torch.load(out / "last.pt", weights_only=True)["args"]
        assert saved["amp"] == "bf16" and saved["aug_compile"] in (None, True), saved
        assert "--amp" not in cmd and "--no-aug-compile" not in cmd


def test_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    """Two SIGINTs in a row: the run stops (exit 130, or 0 when the step and its save ended between
    the two), one line instead of a traceback, and last.pt still loads."""
    write_idx(tmp_path / "data", n_train=80, n_test=10)
    out = tmp_path / "run"
    cmd = run_cmd(TINY + ["--data-dir", str(tmp_path / "data"), "--epochs", "50",
                          "--save-every", "1", "--output-dir", str(out)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    if proc.returncode == 130:
        assert "interrupted" in stderr and "rerun the same command" in stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] > 0


# ---------------------------------------------------------------------------------------- bad input

def train_main(argv):
    return lambda: train.main(harness.Parser(parents=[train.get_args_parser()]).parse_args(argv))


def eval_main(argv):
    return lambda: eval_linear.main(
        harness.Parser(parents=[eval_linear.get_args_parser()]).parse_args(argv))


@pytest.fixture
def fm(tmp_path):
    return str(write_idx(tmp_path / "fm", n_train=40, n_test=10))


@pytest.mark.parametrize("case,argv,expect", [
    ("missing dataset", ["--dataset", "stl10", "--data-dir", "nowhere", "--no-download"],
     "stl10_binary.tar.gz"),
    ("unknown dataset", ["--dataset", "mnist"], "invalid choice: 'mnist'"),
    ("unknown arch", ["--arch", "vgg16"], "invalid choice: 'vgg16'"),
    ("batch below 2", ["--batch-size", "1"], "at least 2"),
    ("batch above dataset", ["--batch-size", "64"], "larger than the 40 images"),
    ("temperature", ["--temperature", "0"], "--temperature must be positive"),
    ("lr", ["--lr", "-0.1"], "--lr must be positive"),
    ("epochs", ["--epochs", "0"], "--epochs must be positive"),
    ("not a number", ["--lr", "fast"], "invalid float value"),
    ("log every 0", ["--log-every", "0"], "--log-every must be at least 1"),
    ("save every negative", ["--save-every", "-1"], "--save-every must be at least 0"),
    ("workers negative", ["--workers", "-1"], "--workers must be at least 0"),
    ("image size 0", ["--image-size", "0"], "--image-size must be positive"),
    ("probability", ["--flip-p", "1.5"], "--flip-p is a probability"),
    ("blur probability", ["--blur-p", "-0.1"], "--blur-p is a probability"),
    ("jitter strength", ["--jitter-strength", "3"], "--jitter-strength s must be in [0, 2.5]"),
    ("crop scale order", ["--crop-scale", "0.5", "0.2"], "--crop-scale takes MIN MAX"),
    ("blur sigma", ["--blur-sigma", "0", "1"], "--blur-sigma takes MIN MAX"),
    ("not a device", ["--device", "gpu0"], "--device gpu0 is not a device"),
    *([("no GPU", ["--device", "cuda"], "no CUDA GPU")] if not torch.cuda.is_available() else []),
])
def test_bad_train_flags(capsys, fm, case, argv, expect):
    err = one_line_exit_2(capsys, train_main(["--dataset", "fashion-mnist", "--data-dir", fm,
                                              *argv]))
    assert expect in err, err


def test_empty_folder_and_folder_without_images(capsys, tmp_path):
    os.makedirs(tmp_path / "empty")
    assert "no readable image" in one_line_exit_2(
        capsys, train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "empty")]))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("not an image")
    assert "no readable image" in one_line_exit_2(
        capsys, train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "texts")]))


def test_batch_that_does_not_divide_over_ranks(capsys, fm):
    args = train.get_args_parser().parse_args(["--batch-size", "15"])
    assert "does not divide over 2 ranks" in one_line_exit_2(
        capsys, lambda: train.resolve_args(args, world_size=2))


def test_output_dir_not_writable(capsys, fm, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    err = one_line_exit_2(capsys, train_main(TINY + ["--data-dir", fm,
                                                     "--output-dir", str(tmp_path / "file" / "x")]))
    assert "is not writable" in err


def test_non_finite_loss_keeps_the_last_good_checkpoint(capsys, fm, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_main(TINY + ["--data-dir", fm, "--output-dir", str(out), "--max-steps", "2"])()
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    real = train.nt_xent
    def diverged(*a, **k):  # from step 3 on
        loss, monitors = real(*a, **k)
        return loss * float("nan"), monitors
    monkeypatch.setattr(train, "nt_xent", diverged)
    err = one_line_exit_2(capsys, train_main(TINY + ["--data-dir", fm, "--output-dir", str(out),
                                                     "--max-steps", "9", "--extend"]))
    assert "loss is not finite at step 3" in err and "last good checkpoint" in err
    assert (out / "last.pt").read_bytes() == before


def test_out_of_memory_is_one_line(capsys, fm, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "train_step", oom)
    err = one_line_exit_2(capsys, train_main(TINY + ["--data-dir", fm,
                                                     "--output-dir", str(tmp_path / "r")]))
    assert "out of memory" in err and "smaller --batch-size" in err


def test_checkpoint_of_another_arch_names_both_and_is_kept(capsys, fm, tmp_path):
    out = tmp_path / "run"
    train_main(TINY + ["--data-dir", fm, "--output-dir", str(out), "--max-steps", "1"])()
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    # width 0.5 into a folder that holds width 0.25
    argv = [a if a != "0.25" else "0.5" for a in TINY]
    err = one_line_exit_2(capsys, train_main(argv + ["--data-dir", fm, "--output-dir", str(out),
                                                     "--max-steps", "2"]))
    assert "width 0.25" in err and "width 0.5" in err
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.parametrize("change,expect", [
    ({"16": "8"}, "--batch-size"),
    ({"off": "bf16"}, "--amp off"),
    ({"--seed": ["--weight-decay", "1e-4", "--seed"]}, "--weight-decay 1e-06 -> 0.0001"),
])
def test_resume_with_another_batch_size_weight_decay_or_amp_is_refused(capsys, fm, tmp_path, change,
                                                                    expect):
    out = tmp_path / "run"
    train_main(TINY + ["--data-dir", fm, "--output-dir", str(out), "--max-steps", "1"])()
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    argv = []
    for a in TINY:
        new = change.get(a, a)
        argv += new if isinstance(new, list) else [new]
    assert expect in one_line_exit_2(
        capsys, train_main(argv + ["--data-dir", fm, "--output-dir", str(out), "--max-steps", "3"]))
    assert (out / "last.pt").read_bytes() == before


def test_a_torn_metrics_line_does_not_stop_a_resume(fm, tmp_path):
    out = tmp_path / "run"
    train_main(TINY + ["--data-dir", fm, "--output-dir", str(out), "--max-steps", "1",
                       "--epochs", "2"])()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed while the line was written
    train_main(TINY + ["--data-dir", fm, "--output-dir", str(out), "--max-steps", "2",
                       "--epochs", "2", "--extend"])()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]  # every line parses again
    assert rows and rows[-1]["step"] == 2


@pytest.mark.parametrize("case,argv,expect", [
    ("no dataset", ["--random-init"], "pass --dataset"),
    ("random init without a checkpoint", ["--random-init", "--dataset", "fashion-mnist"],
     "pass --ckpt"),
    ("max train samples", ["--random-init", "--dataset", "fashion-mnist",
                           "--max-train-samples", "0"],
     "--max-train-samples must be positive"),
    ("knn k", ["--pixels", "--dataset", "fashion-mnist", "--protocol", "knn", "--knn-k", "0"],
     "--knn-k must be positive"),
    ("weight decay", ["--pixels", "--dataset", "fashion-mnist", "--weight-decay", "-1"],
     "--weight-decay"),
    ("label fraction", ["--pixels", "--dataset", "fashion-mnist", "--label-fraction", "2"],
     "label fractions"),
])
def test_bad_eval_flags(capsys, fm, tmp_path, case, argv, expect):
    err = one_line_exit_2(capsys, eval_main(argv + ["--data-dir", fm,
                                                    "--output-dir", str(tmp_path / "e")]))
    assert expect in err, err


def test_eval_output_dir_not_writable_fails_before_the_work(capsys, fm, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    err = one_line_exit_2(capsys, eval_main(["--pixels", "--dataset", "fashion-mnist",
                                             "--data-dir", fm,
                                             "--output-dir", str(tmp_path / "file" / "x")]))
    assert "not writable" in err and "--output-dir" in err


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated", "foreign", "code"])
def test_bad_checkpoints_for_eval(capsys, fm, tmp_path, kind):
    path = tmp_path / "ckpt.pt"
    if kind == "corrupt":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        train_main(TINY + ["--data-dir", fm, "--output-dir", str(tmp_path / "r"),
                           "--max-steps", "1"])()
        path.write_bytes((tmp_path / "r" / "last.pt").read_bytes()[:5000])
    elif kind == "foreign":
        torch.save([1, 2, 3], path)
    elif kind == "code":
        with open(path, "wb") as f:
            pickle.dump(Evil(), f)
    capsys.readouterr()
    err = one_line_exit_2(capsys, eval_main(["--ckpt", str(path), "--data-dir", fm]))
    assert str(path) in err
    assert not os.path.exists("pwned")  # weights_only: loading a checkpoint never runs its code
