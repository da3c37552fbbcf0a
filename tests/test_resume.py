"""Resume never mixes two recipes, ranks agree on the checkpoint, saves follow --save-every-epochs,
and --amp fails early where it cannot work."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import eval_linear
import harness
import train
from conftest import ROOT, one_line_exit_2, write_idx

TINY = ["--dataset", "fashion-mnist", "--arch", "resnet18", "--width", "0.125", "--batch-size", "8",
        "--amp", "off", "--no-download", "--no-aug-compile", "--log-every", "1", "--seed", "0"]


def run(argv):
    return train.main(harness.Parser(parents=[train.get_args_parser()]).parse_args(argv))


@pytest.fixture
def first_part(tmp_path):
    """A run of 2 steps in OUTPUT_DIR, and the common flags that made it."""
    data = str(write_idx(tmp_path / "fm", n_train=40, n_test=10))
    common = TINY + ["--data-dir", data, "--output-dir", str(tmp_path / "run")]
    run(common + ["--max-steps", "2"])
    return common, tmp_path / "run" / "last.pt"


@pytest.mark.parametrize("flags,named", [
    (["--lr", "0.6"], "--lr 0.3 -> 0.6"),
    (["--temperature", "0.2"], "--temperature 0.5 -> 0.2"),
    (["--seed", "1"], "--seed 0 -> 1"),
    (["--crop-scale", "0.2", "1"], "--crop-scale"),
    (["--max-steps", "4"], "--max-steps 2 -> 4"),  # a longer run is a change too, without --extend
    # not extendable
    (["--max-steps", "4", "--warmup-epochs", "1", "--extend"], "--warmup-epochs 10 -> 1.0"),
])
def test_resume_with_a_changed_recipe_is_refused(capsys, first_part, flags, named):
    common, ckpt = first_part
    before = ckpt.read_bytes()
    capsys.readouterr()
    argv = ([a for a in common if a not in ("--seed", "0")]
            + (["--seed", "0"] if "--seed" not in flags else []))
    err = one_line_exit_2(
        capsys, lambda: run(argv + ["--max-steps", "2"] * ("--max-steps" not in flags) + flags))
    assert named in err, err
    assert ckpt.read_bytes() == before  # nothing written


def test_flags_that_cannot_change_the_result_pass(first_part, capsys):
    common, ckpt = first_part
    run(common + ["--max-steps", "2", "--log-every", "7", "--workers", "1", "--save-every", "5"])
    assert "nothing to do" in capsys.readouterr().out


def test_extend_records_the_change_and_its_step(first_part, capsys):
    common, ckpt = first_part
    run(common + ["--max-steps", "4", "--extend"])
    assert "resumed from" in capsys.readouterr().out
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4 and state["args"]["max_steps"] == 4
    assert state["history"] == [{"step": 2, "changed": {"max_steps": (2, 4)}}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_agree_on_the_resume_or_all_stop_with_one_line(first_part, tmp_path):
    """Slow-ish (two processes): rank 0's output dir holds last.pt, rank 1's (another machine's
    disk) does not: every rank says so in one line and exits 2, instead of starting at different
    steps or hanging."""
    common, ckpt = first_part
    port = free_port()
    procs = []
    for rank in (0, 1):
        out = ckpt.parent if rank == 0 else tmp_path / "node1"
        argv = ([a if a != str(ckpt.parent) else str(out) for a in common]
                + ["--max-steps", "2", "--device", "cpu"])
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "TQDM_DISABLE": "1"}
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=180) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 2, (rank, err[-2000:])
        assert "Traceback" not in err and err.count("error: ") == 1, (rank, err[-2000:])
        assert "rank 0 resumes from step 2" in err, (rank, err)
    assert "no checkpoint in this rank's --output-dir" in results[1][1]
    assert not (tmp_path / "node1" / "last.pt").exists()


def test_saves_and_plots_every_save_every_epochs_and_always_the_last(tmp_path, monkeypatch):
    data = str(write_idx(tmp_path / "fm", n_train=16, n_test=10))  # 2 steps per epoch at batch 8
    saved, plotted = [], []
    monkeypatch.setattr(harness.Run, "save", lambda self, step: saved.append(step))
    monkeypatch.setattr(harness.Run, "plot", lambda self: plotted.append(True))
    run(TINY + ["--data-dir", data, "--output-dir", str(tmp_path / "r"), "--epochs", "5",
                "--save-every-epochs", "2", "--save-every-minutes", "0"])
    assert saved == [4, 8, 10]  # epochs 2 and 4, then the last one (5)
    assert len(plotted) == 3


def test_saves_wait_for_save_every_minutes(tmp_path, monkeypatch):
    """A fake clock where each step takes 25 s: epochs (2 steps) end at 50, 100, 150, 200, 250 s.
    With --save-every-minutes 1, an epoch's end saves when a minute has passed since the last save:
    at 100 s and 200 s, then the last step always; epochs of seconds on a fast GPU then cost a save
    a minute, not one each."""
    data = str(write_idx(tmp_path / "fm", n_train=16, n_test=10))  # 2 steps per epoch at batch 8
    saved = []
    now = [0.0]
    monkeypatch.setattr(harness.Run, "save", lambda self, step: saved.append((step, now[0])))
    monkeypatch.setattr(harness.time, "monotonic", lambda: now[0])
    real = train.train_step

    def step_of_25_s(*a, **k):
        now[0] += 25.0
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", step_of_25_s)
    run(TINY + ["--data-dir", data, "--output-dir", str(tmp_path / "r"), "--epochs", "5",
                "--save-every-minutes", "1"])
    assert saved == [(4, 100.0), (8, 200.0), (10, 250.0)]
    summary = json.load(open(tmp_path / "r" / "summary.json"))
    # first step to last, on the same clock
    assert summary["steps"] == 10 and summary["seconds"] == 250.0
    assert summary["img_s_end_to_end"] == round(10 * 8 / 250.0, 1)


@pytest.mark.parametrize("script", ["train", "eval"])
def test_fp16_on_the_cpu_is_refused_before_any_work(capsys, tmp_path, script):
    data = str(write_idx(tmp_path / "fm", n_train=16, n_test=10))
    if script == "train":
        argv = ["fp16" if a == "off" else a for a in TINY]
        fn = lambda: run(argv + ["--data-dir", data,  # noqa: E731
                                 "--output-dir", str(tmp_path / "r")])
    else:
        parser = harness.Parser(parents=[eval_linear.get_args_parser()])
        fn = lambda: eval_linear.main(parser.parse_args(  # noqa
            ["--pixels", "--dataset", "fashion-mnist", "--data-dir", data, "--amp", "fp16",
             "--device", "cpu"]))
    err = one_line_exit_2(capsys, fn)
    assert "--amp fp16 on the CPU" in err and "bf16" in err
    assert not os.path.exists(tmp_path / "r" / "last.pt")


def test_bf16_support_does_not_count_emulation(monkeypatch):
    """Pre-Ampere GPUs emulate bf16 slowly: the fp16 fallback asks torch without emulation."""
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert harness.amp_dtype("bf16", torch.device("cuda", 0)) == torch.float16
    assert calls == [False]
