"""torch.distributed on the CPU (gloo, 2 processes): the gathered NT-Xent and global BN give the
loss and the gradients of one process on the whole batch; torchrun runs train.py and its checkpoint
resumes in 1 process."""
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import ROOT, write_idx
from loss import nt_xent
from model import SimCLR, convert_global_bn

N, SIZE = 8, 16  # global batch of images, image side


def fixed_views():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, SIZE, SIZE, generator=g, dtype=torch.float64), \
        torch.randn(N, 3, SIZE, SIZE, generator=g, dtype=torch.float64)


def make_model():
    torch.manual_seed(0)
    return SimCLR("resnet18", proj_dim=16, cifar_stem=True, width=0.125).double()


def single_process():
    v1, v2 = fixed_views()
    model = make_model()
    _, z = model(torch.cat([v1, v2]))  # (2N, 16)
    loss = nt_xent(z[:N], z[N:], 0.5)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


# name: (gather the negatives, global BN); the two broken ones show that the check below can fail
VARIANTS = {"gathered": (True, True), "local negatives": (False, True),
            "per-rank BN": (True, False)}


def _rank(rank, world, init_file, out):
    """One of `world` gloo ranks: loss (averaged over ranks) and gradients of a fresh model for each
    variant."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        v1, v2 = fixed_views()
        n = N // world
        mine = slice(rank * n, (rank + 1) * n)
        runs = {}
        for name, (gather, global_bn) in VARIANTS.items():
            model = convert_global_bn(make_model()) if global_bn else make_model()
            ddp = DDP(model)  # held until after backward: its hooks average the gradients
            _, z = ddp(torch.cat([v1[mine], v2[mine]]))  # (2n, 16): this rank's images only
            # its anchors against the 2N embeddings of all ranks
            loss = nt_xent(z[:n], z[n:], 0.5, gather=gather)
            loss.backward()  # DDP averages the gradients over the ranks
            total = loss.detach().clone()
            dist.all_reduce(total)
            runs[name] = {"loss": total / world,
                          "grads": {k: p.grad for k, p in model.named_parameters()}}
        if rank == 0:
            torch.save(runs, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Slow-ish (two processes start): every variant from one 2-rank gloo run."""
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_rank, args=(2, str(tmp / "init"), str(tmp / "rank0.pt")), nprocs=2, join=True)
    return torch.load(tmp / "rank0.pt", weights_only=True)


def assert_equals_one_process(got):
    """Loss and every gradient of 2 ranks equal those of 1 process on the whole batch. float64
    (eps 1.1e-16): the ranks sum the BN statistics and the gradients over ranks, through 20 BN
    layers, in another order than one process: ~1e-14 relative (measured 4e-16 on the loss of 2.7,
    3e-15 on gradients <= 0.7) -> loss atol 1e-12, gradients rtol 1e-9, atol 1e-12; a float32 step
    anywhere would be off by ~1e-7."""
    loss, grads = single_process()
    torch.testing.assert_close(got["loss"], loss, rtol=0, atol=1e-12)
    bad = {k: (got["grads"][k] - grads[k]).abs().max().item() for k in grads
           if not torch.allclose(got["grads"][k], grads[k], rtol=1e-9, atol=1e-12)}
    assert not bad, bad


def test_two_ranks_equal_one_process(two_ranks):
    assert len([k for k in two_ranks["gathered"]["grads"] if k.startswith("encoder.")]) > 20
    assert_equals_one_process(two_ranks["gathered"])


@pytest.mark.parametrize("variant", ["local negatives", "per-rank BN"])
def test_two_rank_check_fails_without_gather_or_global_bn(two_ranks, variant):
    """The check above can fail: the same 2-rank run with each rank's own negatives only (the gather
    skipped) or with per-rank BN is 1e-3 or more away from one process in the loss, where the
    gathered run matches to 1e-12."""
    loss, _ = single_process()
    assert (two_ranks[variant]["loss"] - loss).abs() > 1e-3
    with pytest.raises(AssertionError):
        assert_equals_one_process(two_ranks[variant])


def torchrun(*args, timeout=240):
    """torchrun in its own process group, all of which is killed if it hangs (no orphaned ranks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_two_processes_then_resume_in_one(tmp_path):
    """Slow-ish (two torch processes start): torchrun trains 3 steps, one checkpoint, resumed by one
    process."""
    # idx files: no md5 check to patch in the subprocesses
    write_idx(tmp_path / "data", n_train=40, n_test=10)
    out = tmp_path / "run"
    common = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
              "--arch", "resnet18", "--width", "0.125", "--batch-size", "16", "--workers", "0",
              "--amp", "off", "--no-download", "--no-aug-compile", "--output-dir", str(out),
              "--log-every", "1"]
    r = torchrun(*common, "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world_size\": 2" in r.stdout and sorted(os.listdir(out)).count("last.pt") == 1
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    import train
    # a longer run
    train.main(train.get_args_parser().parse_args(common + ["--max-steps", "5", "--extend"]))
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 5


def test_batch_that_does_not_divide_over_ranks_is_one_line(tmp_path):
    write_idx(tmp_path / "data", n_train=40, n_test=10)
    r = torchrun("--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
                 "--batch-size", "15", "--no-download", "--output-dir", str(tmp_path / "run"))
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "does not divide over 2 ranks" in lines[0]
