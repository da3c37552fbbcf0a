"""Multi-crop (SwAV's small crops): the loss with several positives per image against a slow
reference and against nt_xent at two crops; the crops of both pipelines, BN per resolution, the
training step, flags and resume, and 2 gloo ranks against one process."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import harness
import train
from conftest import ROOT, one_line_exit_2, write_folder, write_idx
from loss import multi_crop_nt_xent, nt_xent
from model import SimCLR, convert_global_bn


def reference_loss(z, crops, tau):
    """The multi-crop loss written out slowly in float64: for each image, each ordered pair (a, p)
    of its crops, -log(exp(s_ap) / (exp(s_ap) + sum over the crops k of other images exp(s_ak))),
    the mean over every pair."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    n = len(z) // crops
    image = [r % n for r in range(len(z))]
    terms = []
    for a in range(len(z)):
        negatives = sum(math.exp(z[a].dot(z[k]).item() / tau) for k in range(len(z))
                        if image[k] != image[a])
        for p in range(len(z)):
            if p != a and image[p] == image[a]:
                pos = math.exp(z[a].dot(z[p]).item() / tau)
                terms.append(-math.log(pos / (pos + negatives)))
    assert len(terms) == n * crops * (crops - 1)
    return sum(terms) / len(terms)


def reference_top1(z, crops):
    """The share of anchors whose most similar other crop is one of their positives, a tie of t
    candidates with h positives among them counting h / t."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    n = len(z) // crops
    total = 0.0
    for a in range(len(z)):
        sims = [(z[a].dot(z[k]).item(), k % n == a % n) for k in range(len(z)) if k != a]
        best = max(s for s, _ in sims)
        tied = [same for s, same in sims if s == best]
        total += sum(tied) / len(tied)
    return total / len(z)


@pytest.mark.parametrize("n,crops,tau", [(4, 3, 0.5), (6, 6, 0.2), (3, 8, 0.1)])
def test_multi_crop_loss_matches_the_slow_reference(n, crops, tau):
    gen = torch.Generator().manual_seed(n * crops)
    z = torch.randn(n * crops, 16, generator=gen, dtype=torch.float64)
    loss, monitors = multi_crop_nt_xent(z, crops, tau, monitors=True)
    # float64, the same terms summed in another order: ~1e-15 relative
    assert loss.item() == pytest.approx(reference_loss(z, crops, tau), rel=1e-12)
    assert monitors["contrastive_top1"].item() == pytest.approx(reference_top1(z, crops))


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_at_two_crops_it_is_nt_xent(tau):
    """Values, gradients and monitors; float32 inputs: the two compute log-sum-exps over the same
    2N - 1 logits (<= 1/tau = 10) in another order, a few ulp(6) = 5e-7 apart -> 1e-5."""
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 24, generator=gen, requires_grad=True)
    z2 = torch.randn(32, 24, generator=gen, requires_grad=True)
    ours, m_ours = multi_crop_nt_xent(torch.cat([z1, z2]), 2, tau, monitors=True)
    g_ours = torch.autograd.grad(ours, [z1, z2])
    theirs, m_theirs = nt_xent(z1, z2, tau, monitors=True)
    g_theirs = torch.autograd.grad(theirs, [z1, z2])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for a, b in zip(g_ours, g_theirs):  # gradients of size ~1 / (2N tau): 1e-6
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for key in ("contrastive_top1", "spread"):
        torch.testing.assert_close(m_ours[key], m_theirs[key])


def test_gradients_match_the_reference():
    """Autograd of the fast form against central differences of the slow float64 reference."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3 * 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = multi_crop_nt_xent(z, 4, 0.3)
    grad, = torch.autograd.grad(loss, z)
    eps = 1e-6
    numeric = torch.zeros_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            plus = z.detach().clone()
            plus[i, j] += eps
            minus = z.detach().clone()
            minus[i, j] -= eps
            change = reference_loss(plus, 4, 0.3) - reference_loss(minus, 4, 0.3)
            numeric[i, j] = change / (2 * eps)
    # central differences: error O(eps^2 f''') ~ 1e-12 plus rounding 1e-16 / eps = 1e-10 -> 1e-7
    torch.testing.assert_close(grad, numeric, atol=1e-7, rtol=0)


def test_identical_crops_find_their_positives_and_a_collapse_scores_chance():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(5, 8, generator=gen)
    same = images.repeat(4, 1)  # 4 identical crops of each of 5 images
    _, m = multi_crop_nt_xent(same, 4, 0.5, monitors=True)
    assert m["contrastive_top1"].item() == 1.0
    _, m = multi_crop_nt_xent(torch.ones(20, 8), 4, 0.5, monitors=True)
    # every other crop tied: 3 positives among 19 candidates
    assert m["contrastive_top1"].item() == pytest.approx(3 / 19)
    assert m["spread"].item() == 0.0


def test_rows_that_are_not_whole_images_are_refused():
    with pytest.raises(ValueError, match="not 3"):
        multi_crop_nt_xent(torch.randn(10, 4), 3)
    with pytest.raises(ValueError, match="at least 2"):
        multi_crop_nt_xent(torch.randn(10, 4), 1)


# ------------------------------------------------------------------------------ crops and training
TINY = ["--dataset", "fashion-mnist", "--arch", "resnet18", "--width", "0.125", "--batch-size", "8",
        "--amp", "off", "--no-download", "--no-aug-compile", "--log-every", "1", "--seed", "0"]


def run(argv):
    return train.main(harness.Parser(parents=[train.get_args_parser()]).parse_args(argv))


def batches_of(tmp_path, pipeline, small_crops):
    ds = data.get_dataset("fashion-mnist", write_idx(tmp_path / "fm", n_train=24, n_test=4),
                          "train")
    args = train.resolve_args(train.get_args_parser().parse_args(
        TINY + ["--pipeline", pipeline, "--small-crops", str(small_crops), "--small-size", "12",
                "--workers", "0"]))
    return list(train.two_view_batches(ds, args, 0, 1, torch.device("cpu")).epoch(0))


@pytest.mark.parametrize("pipeline", ["batched", "per-image"])
def test_small_crops_leave_the_views_as_they_were(tmp_path, pipeline):
    """With V small crops each batch is [views, small (V n, 3, s, s)], and the two views are those
    of the run without small crops, bit for bit (the small crops are drawn after them): 0 small
    crops is today's SimCLR."""
    plain = batches_of(tmp_path, pipeline, 0)
    multi = batches_of(tmp_path, pipeline, 3)
    assert len(plain) == len(multi) == 3
    for (views, y), ([views_m, small], y_m) in zip(plain, multi):
        assert torch.equal(views, views_m) and torch.equal(y, y_m)
        assert views.shape == (16, 3, 28, 28) and small.shape == (24, 3, 12, 12)
        # each small crop its own draw: no two equal
        assert all(not torch.equal(small[i], small[8 + i]) for i in range(8))


def test_each_resolution_is_its_own_batch_for_bn():
    """SimCLR.forward on [large, small]: the encoder normalises each resolution with its own batch
    statistics (as two separate calls do), the head takes all the rows at once."""
    torch.manual_seed(0)
    model = SimCLR("resnet18", proj_dim=8, cifar_stem=True, width=0.125).double()
    large = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    small = torch.randn(9, 3, 8, 8, dtype=torch.float64)
    h, z = model([large, small])
    h_apart = torch.cat([model.encoder(large), model.encoder(small)])
    torch.testing.assert_close(h, h_apart, rtol=0, atol=0)  # the same ops on the same batches
    torch.testing.assert_close(z, model.projector(h_apart), rtol=0, atol=0)
    mixed = model.encoder(torch.cat([large, torch.nn.functional.interpolate(small, 16)]))
    assert not torch.allclose(mixed[:6], h[:6])  # pooled BN statistics would differ


@pytest.mark.parametrize("pipeline", ["batched", "per-image"])
def test_trains_on_fashion_mnist_and_on_a_folder(tmp_path, pipeline):
    fm = str(write_idx(tmp_path / "fm", n_train=24, n_test=4))
    folder = str(write_folder(tmp_path / "photos", per_class=8, size=40))
    for dataset, data_dir, size in (("fashion-mnist", fm, "28"), ("folder", folder, "32")):
        out = tmp_path / dataset
        argv = [a if a != "fashion-mnist" else dataset for a in TINY]
        run(argv + ["--data-dir", data_dir, "--output-dir", str(out), "--max-steps", "2",
                    "--pipeline", pipeline, "--workers", "0", "--image-size", size,
                    "--small-crops", "4"])
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
        # 6 crops of 8 images: chance is 5 positives among 47 candidates
        assert all(0 <= r["contrastive_top1"] <= 100 and r["spread"] > 0 for r in rows)
        ckpt = torch.load(out / "last.pt", weights_only=True)
        assert ckpt["args"]["small_crops"] == 4 and ckpt["args"]["small_size"] == round(
            int(size) * 96 / 224)


def test_the_step_follows_the_multi_crop_loss():
    """train_step on [views, small] moves the parameters by -lr x 2 x the gradient of the multi-crop
    loss of one forward over both resolutions (SGD, float64)."""
    torch.manual_seed(0)
    model = SimCLR("resnet18", proj_dim=8, cifar_stem=True, width=0.125).double()
    views = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    small = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    args = train.get_args_parser().parse_args(["--small-crops", "3", "--no-channels-last"])
    _, z = model([views, small])
    loss = multi_crop_nt_xent(z, 5, args.temperature)
    grads = torch.autograd.grad(2 * loss, list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    logged, h, _ = train.train_step(model, [views, small], opt, scaler, None, args)
    assert h.shape[0] == 8 and logged.item() == pytest.approx(loss.item(), rel=1e-12)
    # float64, the same graph twice: equal to rounding of ~1e-16 relative
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("argv,expect", [
    (["--small-crops", "2", "--small-size", "40"], "--small-size 40 is larger than the views' 28"),
    (["--small-crops", "2", "--micro-batch", "4"], "--micro-batch does not take --small-crops"),
    (["--small-crops", "2", "--small-crop-scale", "0", "0.1"], "--small-crop-scale takes MIN MAX"),
    (["--small-crops", "2", "--small-crop-scale", "0.1", "1.5"], "--small-crop-scale takes MIN"),
    (["--small-crops", "-1"], "--small-crops must be at least 0"),
])
def test_bad_multi_crop_flags_are_one_line(capsys, tmp_path, argv, expect):
    fm = str(write_idx(tmp_path / "fm", n_train=24, n_test=4))
    err = one_line_exit_2(capsys, lambda: run(TINY + ["--data-dir", fm, "--output-dir",
                                                      str(tmp_path / "r")] + argv))
    assert expect in err, err


def test_a_resume_refuses_other_crop_settings(capsys, tmp_path):
    fm = str(write_idx(tmp_path / "fm", n_train=24, n_test=4))
    common = TINY + ["--data-dir", fm, "--output-dir", str(tmp_path / "r"), "--max-steps", "2"]
    run(common + ["--small-crops", "2"])
    before = (tmp_path / "r" / "last.pt").read_bytes()
    capsys.readouterr()
    for change, named in ((["--small-crops", "4"], "--small-crops 2 -> 4"),
                          (["--small-crops", "2", "--small-size", "10"], "--small-size 12 -> 10"),
                          (["--small-crops", "2", "--small-crop-scale", "0.1", "0.2"],
                           "--small-crop-scale")):
        err = one_line_exit_2(capsys, lambda: run(common + change))
        assert named in err, err
    assert (tmp_path / "r" / "last.pt").read_bytes() == before


def test_killed_multi_crop_run_resumes_bit_identical(tmp_path):
    """Slow-ish (three training processes): SIGKILL after the first checkpoint, then the same
    command again: weights and optimiser state equal those of an uninterrupted run, bit for bit."""
    write_idx(tmp_path / "data", n_train=80, n_test=10)  # 10 steps per epoch
    args = TINY + ["--data-dir", str(tmp_path / "data"), "--epochs", "4", "--warmup-epochs", "1",
                   "--save-every", "2", "--small-crops", "2", "--log-every", "5"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    ref = subprocess.run(cmd + ["--output-dir", str(tmp_path / "ref")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd + ["--output-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.kill()
    proc.communicate(timeout=60)
    stopped_at = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 0 < stopped_at < 40
    again = subprocess.run(cmd + ["--output-dir", str(out)], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)


# ------------------------------------------------------------------------ two ranks against one
N, SIZE, SMALL, V = 8, 16, 8, 3


def fixed_crops():
    g = torch.Generator().manual_seed(0)
    views = torch.randn(2, N, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    small = torch.randn(V, N, 3, SMALL, SMALL, generator=g, dtype=torch.float64)
    return views, small  # (2, N, ...) and (V, N, ...): crop-major


def make_model():
    torch.manual_seed(0)
    return SimCLR("resnet18", proj_dim=16, cifar_stem=True, width=0.125).double()


def _rank(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        views, small = fixed_crops()
        n = N // world
        mine = slice(rank * n, (rank + 1) * n)
        model = convert_global_bn(make_model())
        ddp = DDP(model)
        crops = [views[:, mine].reshape(-1, 3, SIZE, SIZE), small[:, mine].reshape(-1, 3, SMALL,
                                                                                    SMALL)]
        _, z = ddp(crops)  # (C n, 16): this rank's crops, crop-major
        loss = multi_crop_nt_xent(z, 2 + V, 0.5)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total / world,
                        "grads": {k: p.grad for k, p in model.named_parameters()}}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    """Slow-ish (two processes): 2 gloo ranks with DDP and global BN (per resolution), each scoring
    its own crops against the gathered crops of both, give one process's loss and gradients on the
    whole batch. float64, sums over ranks in another order: as tests/test_distributed.py, loss atol
    1e-12, gradients rtol 1e-9 (a rank's own negatives only would be 1e-3 off)."""
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "r0.pt")), nprocs=2,
             join=True)
    got = torch.load(tmp_path / "r0.pt", weights_only=True)
    views, small = fixed_crops()
    model = make_model()
    _, z = model([views.reshape(-1, 3, SIZE, SIZE), small.reshape(-1, 3, SMALL, SMALL)])
    loss = multi_crop_nt_xent(z, 2 + V, 0.5)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=0, atol=1e-12)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-9, atol=1e-12, msg=k)


def test_torchrun_trains_with_small_crops(tmp_path):
    """Slow-ish (torchrun, two processes): train.py with --small-crops under 2 gloo ranks."""
    write_idx(tmp_path / "data", n_train=40, n_test=10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *TINY, "--data-dir", str(tmp_path / "data"),
           "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--small-crops", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def test_bench_times_the_step_per_number_of_small_crops(tmp_path):
    """bench.py --crops runs the full step at each number of small crops (the table is a benchmark,
    not a claim of this test) and writes one time per number."""
    import bench
    out = tmp_path / "crops.json"
    args = bench.get_args_parser().parse_args(
        ["--width", "0.125", "--image-size", "28", "--batch-size", "4", "--steps", "1", "--reps",
         "1", "--no-aug-compile", "--amp", "off", "--crops", "0", "2", "--out", str(out)])
    res = bench.main(args)
    assert json.loads(out.read_text()) == res
    assert set(res["ms_per_step"]) == {"0", "2"} and res["small_size"] == 12
    assert all(ms > 0 for ms in res["ms_per_step"].values())
