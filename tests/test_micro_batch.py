"""--micro-batch, gradient caching (Gao et al. 2021): the loss and gradients of the whole batch with
the memory of a micro-batch, where BN normalises each micro-batch as each rank of DDP without sync
BN does. float64 references."""
import json
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import harness
import train
from conftest import one_line_exit_2, write_idx
from loss import nt_xent
from model import SimCLR

N, SIZE = 8, 16  # images per step, image side


def fixed_views(n=N):
    """(2n, 3, S, S) float64: view 1 of image i at row i, view 2 at row n + i."""
    return torch.randn(2 * n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)


def make_model(dropout=False):
    torch.manual_seed(0)
    model = SimCLR("resnet18", proj_dim=16, cifar_stem=True, width=0.125).double()
    if dropout:  # randomness inside the model: both passes must draw the same masks
        model.projector.net.insert(3, nn.Dropout(0.3))
    return model


def step(model, views, micro_batch, scaler=None, dtype=None, probe=None, seed=1):
    """train.train_step with an optimiser that does not move the weights
    -> (loss, {name: 2 dL/dw})."""
    torch.manual_seed(seed)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    labels = torch.zeros(views.shape[0] // 2, dtype=torch.long)
    argv = ["--temperature", "0.5", "--no-channels-last"]
    if micro_batch:
        argv += ["--micro-batch", str(micro_batch)]
    loss, h, _ = train.train_step(model, views, opt, scaler, dtype,
                                  train.get_args_parser().parse_args(argv))
    if probe is not None:  # as train.py's loop feeds its online probe
        probe.step(h, torch.cat([labels, labels]))
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}


def kept_graph(model, views, m, seed=1):
    """The slow obvious way: every micro-batch forwarded with its graph kept, the loss over all of
    them, one backward -> (loss, {name: 2 dL/dw}). What gradient caching computes, with the memory
    of the whole batch."""
    torch.manual_seed(seed)
    n = views.shape[0] // 2
    # each (2m, d)
    zs = [model(torch.cat([views[i:i + m], views[n + i:n + i + m]]))[1] for i in range(0, n, m)]
    z1, z2 = torch.cat([z[:m] for z in zs]), torch.cat([z[m:] for z in zs])  # (n, d) each
    loss = nt_xent(z1, z2, 0.5)
    (2 * loss).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_same(got, want, atol=1e-10):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=atol)
    bad = {k: (got[1][k] - g).abs().max().item() for k, g in want[1].items()
           if not torch.allclose(got[1][k], g, rtol=1e-8, atol=atol)}
    assert not bad, bad


def test_without_batch_statistics_it_equals_one_pass_over_the_whole_batch():
    """BN in eval mode: every view's z depends on its own image only, so the split cannot show.
    float64: measured ~3e-16 apart; 1e-10 leaves room for other summation orders."""
    views = fixed_views()
    whole = step(make_model().eval(), views, None)
    assert_same(step(make_model().eval(), views, 2), whole)


def test_train_mode_bn_normalises_each_micro_batch_and_updates_its_statistics_once():
    """BN in train mode (and dropout, drawn alike by both passes): the loss and gradients of the
    micro-batches forwarded with their graphs kept, 1e-3 or more away from one pass over the whole
    batch. The running statistics take one update per micro-batch (num_batches_tracked K,
    not 2K)."""
    views, m = fixed_views(), 4
    model, ref = make_model(dropout=True), make_model(dropout=True)
    got = step(model, views, m)
    want = kept_graph(ref, views, m)
    assert_same(got, want)
    for (k, b), r in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, rtol=0, atol=1e-12, msg=k)
    assert model.encoder.bn1.num_batches_tracked.item() == N // m
    assert (got[0] - step(make_model(dropout=True), views, None)[0]).abs() > 1e-3


def test_the_scaler_scales_the_cached_gradient():
    """fp16's GradScaler path, on the CPU in float64 (fp16 autocast is refused there): an enabled
    scaler, then the unscaled gradients of the step equal those of one pass; an unscaled z-gradient
    would be 2^12 times too small."""
    views = fixed_views()
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)
               for _ in range(2)]
    whole = step(make_model().eval(), views, None, scalers[0])
    assert_same(step(make_model().eval(), views, 2, scalers[1]), whole)
    # both steps were finite: the scale grew
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0 ** 13


def test_bf16_autocast_is_close_to_one_pass():
    """bf16 (8 mantissa bits) rounds each pass on its own: the loss to 1e-2, the gradients to 5% of
    their norm."""
    views = fixed_views().float()
    whole = step(make_model().float().eval(), views, None, dtype=torch.bfloat16)
    got = step(make_model().float().eval(), views, 2, dtype=torch.bfloat16)
    torch.testing.assert_close(got[0], whole[0], rtol=1e-2, atol=0)
    for k, g in whole[1].items():
        assert (got[1][k] - g).norm() <= 0.05 * g.norm() + 1e-6, k


class Recorder:
    def step(self, h, y):
        self.h, self.y = h, y


def test_the_probe_sees_the_features_of_every_micro_batch_in_the_rows_of_the_views():
    views, probes = fixed_views(), (Recorder(), Recorder())
    step(make_model().eval(), views, None, probe=probes[0])
    step(make_model().eval(), views, 4, probe=probes[1])
    assert not probes[1].h.requires_grad
    torch.testing.assert_close(probes[1].h, probes[0].h, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- DDP

def _rank(rank, world, init_file, out):
    """Rank r of 2 (gloo, no sync BN): (a) plain DDP on micro-batch r of the whole batch, (b) DDP
    with --micro-batch on the rank's half of the batch."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        views, n = fixed_views(), N // world
        # (2n, ...)
        mine = torch.cat([views[rank * n:(rank + 1) * n], views[N + rank * n:N + (rank + 1) * n]])
        runs = {}
        for name, m in (("plain", None), ("cached", n // 2)):
            loss, grads = step(DDP(make_model()), mine, m)
            dist.all_reduce(loss)
            runs[name] = (loss / world, {k.removeprefix("module."): g for k, g in grads.items()})
        if rank == 0:
            torch.save(runs, out)
    finally:
        dist.destroy_process_group()


def test_micro_batches_equal_ddp_ranks_without_sync_bn(tmp_path):
    """Slow-ish (two processes). One process with micro-batches of 4 = 2 DDP ranks of 4 images each;
    2 ranks that each split their 4 images into micro-batches of 2 = one process with micro-batches
    of 2."""
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "rank0.pt")),
             nprocs=2, join=True)
    runs = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert_same(runs["plain"], step(make_model(), fixed_views(), N // 2))
    assert_same(runs["cached"], step(make_model(), fixed_views(), N // 4))


# ----------------------------------------------------------------------------------------- train.py

TINY = ["--dataset", "fashion-mnist", "--arch", "resnet18", "--width", "0.125", "--batch-size", "8",
        "--amp", "off", "--no-download", "--no-aug-compile", "--log-every", "1", "--seed", "0",
        "--micro-batch", "4"]


def run(argv):
    return train.main(harness.Parser(parents=[train.get_args_parser()]).parse_args(argv))


@pytest.fixture
def fm(tmp_path):
    return str(write_idx(tmp_path / "fm", n_train=40, n_test=10))


@pytest.mark.parametrize("batch,micro,world,expect", [
    ("8", "3", 1, "--micro-batch 3 does not divide the 8 images per rank"),
    ("8", "16", 1, "--micro-batch 16 is larger than the 8 images per rank"),
    ("8", "8", 2,
     "--micro-batch 8 is larger than the 4 images per rank (--batch-size 8 / 2 ranks)"),
])
def test_a_micro_batch_that_does_not_divide_the_rank_batch_is_one_line(capsys, fm, batch, micro,
                                                                       world, expect):
    args = train.get_args_parser().parse_args(["--batch-size", batch, "--micro-batch", micro])
    err = one_line_exit_2(capsys, lambda: train.resolve_args(args, world_size=world))
    assert expect in err and "use a divisor of" in err, err


def test_a_stopped_run_resumes_bit_identical_and_refuses_another_micro_batch(capsys, fm, tmp_path,
                                                                             monkeypatch):
    """SIGTERM after step 2 of 4 (the loop saves and returns), the same command again: the weights,
    optimiser and probe states equal those of an uninterrupted run bit for bit. Then
    --micro-batch 2 on that checkpoint is refused: with BN in train mode it changes the result."""
    common = TINY + ["--data-dir", fm, "--max-steps", "4", "--probe", "--knn-every", "0"]
    run(common + ["--output-dir", str(tmp_path / "ref")])
    real, calls = train.train_step, []

    def stop_after_2(*a, **k):
        loss = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return loss
    monkeypatch.setattr(train, "train_step", stop_after_2)
    out = tmp_path / "run"
    run(common + ["--output-dir", str(out)])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train, "train_step", real)
    run(common + ["--output-dir", str(out)])
    assert "resumed from" in capsys.readouterr().out
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "ref", out))
    assert a["step"] == b["step"] == 4 and a["args"]["micro_batch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in s.items()), i
    assert all(torch.equal(v, b["probe"]["head"][k]) for k, v in a["probe"]["head"].items())

    assert "micro_batch" not in train.NEUTRAL
    argv = [a if a != "4" else "2" for a in common]
    assert "--micro-batch 4 -> 2" in one_line_exit_2(
        capsys, lambda: run(argv + ["--output-dir", str(out)]))


class Small(nn.Module):
    """A conv, train-mode BN and a linear head, (h, z) like SimCLR: compiles in seconds where a
    ResNet takes minutes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.encoder(x)  # (B, 8)
        return h, self.head(h)  # (B, 4)


def test_compiled_model_serves_both_passes():
    """Slow-ish (torch.compile of the no-graph pass, the graph pass and its backward on the CPU):
    the compiled module gives the eager step's loss and gradients (float32, other kernels: 1e-5)."""
    views = fixed_views().float()
    eager = step(Small(), views, 2)
    model = Small()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # earlier tests in this process compiled other functions
    loss, _ = step(torch.compile(model), views, 2)
    # the pass without a graph, the one with
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(loss, eager[0], rtol=1e-5, atol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_bench_memory_runs_and_writes_its_numbers(tmp_path):
    """Slow-ish (three fresh processes): bench.py --memory at a tiny size."""
    import bench
    out = tmp_path / "bench.json"
    bench.main(bench.get_args_parser().parse_args(
        ["--memory", "--width", "0.125", "--image-size", "16", "--plain-batches", "4", "8",
         "--cached-batches", "8", "--micro-batch", "2", "--batch-size", "8", "--steps", "1",
         "--amp", "off", "--out", str(out)]))
    res = json.loads(out.read_text())
    assert (set(res["peak_mib"]) == {"4/4", "8/8", "8/2"}
            and all(v > 0 for v in res["peak_mib"].values()))
    assert (res["ms_per_image_plain"] > 0 and res["ms_per_image_cached"] > 0
            and "plain_extrapolated_mib" in res)
