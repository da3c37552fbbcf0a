"""torch.distributed on the CPU (gloo, 2 processes): the gathered NT-Xent and global BN give the loss and the
gradients of one process on the whole batch; torchrun runs train.py and its checkpoint resumes in 1 process."""
import os
import signal
import subprocess
import sys

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


def _rank(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        v1, v2 = fixed_views()
        n = N // world
        mine = slice(rank * n, (rank + 1) * n)
        model = convert_global_bn(make_model())
        ddp = DDP(model)
        _, z = ddp(torch.cat([v1[mine], v2[mine]]))  # (2n, 16): this rank's images only
        loss = nt_xent(z[:n], z[n:], 0.5)  # its anchors against the 2N embeddings of all ranks
        loss.backward()  # DDP averages the gradients over the ranks
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total / world, "grads": {k: p.grad for k, p in model.named_parameters()}}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    loss, grads = single_process()
    torch.testing.assert_close(got["loss"], loss, rtol=0, atol=1e-10)
    encoder = [k for k in grads if k.startswith("encoder.")]
    assert len(encoder) > 20
    bad = {k: (got["grads"][k] - grads[k]).abs().max().item() for k in grads
           if not torch.allclose(got["grads"][k], grads[k], rtol=1e-7, atol=1e-10)}
    assert not bad, bad


def test_local_negatives_only_would_differ(tmp_path):
    """The check above can fail: without the gather (or with per-rank BN) the gradients are not the same."""
    v1, v2 = fixed_views()
    model = make_model()
    _, z = model(torch.cat([v1[:N // 2], v2[:N // 2]]))
    local = nt_xent(z[:N // 2], z[N // 2:], 0.5)
    loss, _ = single_process()
    assert abs(local.item() - loss.item()) > 1e-3


def torchrun(*args, timeout=240):
    """torchrun in its own process group, all of which is killed if it hangs (no orphaned ranks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_two_processes_then_resume_in_one(tmp_path):
    """Slow-ish (two torch processes start): torchrun trains 3 steps, one checkpoint, resumed by one process."""
    write_idx(tmp_path / "data", n_train=40, n_test=10)  # idx files: no md5 check to patch in the subprocesses
    out = tmp_path / "run"
    common = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--arch", "resnet18", "--width", "0.125",
              "--batch-size", "16", "--workers", "0", "--amp", "off", "--no-download", "--no-aug-compile",
              "--output-dir", str(out), "--log-every", "1"]
    r = torchrun(*common, "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world_size\": 2" in r.stdout and sorted(os.listdir(out)).count("last.pt") == 1
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    import train
    train.main(train.get_args_parser().parse_args(common + ["--max-steps", "5"]))
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 5


def test_batch_that_does_not_divide_over_ranks_is_one_line(tmp_path):
    write_idx(tmp_path / "data", n_train=40, n_test=10)
    r = torchrun("--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--batch-size", "15", "--no-download",
                 "--output-dir", str(tmp_path / "run"))
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "does not divide over 2 ranks" in lines[0]
