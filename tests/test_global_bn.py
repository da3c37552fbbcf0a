"""GlobalBatchNorm over 2 gloo processes equals nn.BatchNorm on the whole batch, in float32, on
inputs whose mean (1e4) is large against their spread (1), where E[x^2] - E[x]^2 loses every digit
of the variance."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from model import GlobalBatchNorm

N, C, H = 8, 3, 4  # global batch, channels, image side
ULP = 2.0 ** -10  # float32 spacing of numbers in [2^13, 2^14), around the mean 1e4


def batch():
    """Float32 inputs 1e4 + N(0, 1), the gradient of the output, and the affine parameters."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(N, C, H, H, generator=g)
    return (x, torch.randn(N, C, H, H, generator=g), 1 + torch.rand(C, generator=g),
            torch.randn(C, generator=g))


def reference():
    """nn.BatchNorm2d in train mode on the whole batch: output, input gradient, state_dict."""
    x, dy, w, b = batch()
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    x.requires_grad_()
    y = bn(x)
    y.backward(dy)
    return y.detach(), x.grad, bn.state_dict()


def _rank(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, dy, w, b = batch()
        mine = slice(rank * N // world, (rank + 1) * N // world)
        bn = GlobalBatchNorm(C)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        x = x[mine].clone().requires_grad_()
        y = bn(x)  # this rank's half, normalised with the statistics of the whole batch
        y.backward(dy[mine])
        torch.save({"y": y.detach(), "grad": x.grad, "state": bn.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_batch_norm_on_the_whole_batch_with_a_large_mean(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    y, grad, state = reference()
    # The mean of values near 1e4 is known to a few float32 ulps of 1e4 (ULP ~ 1e-3) in either
    # implementation, each summing in its own order; that error reaches the normalised output and
    # the input gradient unscaled (std ~ 1, weights < 2). E[x^2] - E[x]^2 would be off by ulps
    # of 1e8 (8), not of 1e4.
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y, rtol=0, atol=8 * ULP)
    torch.testing.assert_close(torch.cat([g["grad"] for g in got]), grad, rtol=0, atol=8 * ULP)
    for g in got:
        assert g["state"].keys() == state.keys()
        assert g["state"]["num_batches_tracked"] == state["num_batches_tracked"] == 1
        # running_mean = 0.9 * 0 + 0.1 * mean: a tenth of the error of the mean, plus rounding
        # near 1e3
        torch.testing.assert_close(g["state"]["running_mean"], state["running_mean"],
                                   rtol=0, atol=ULP)
        # running_var = 0.9 + 0.1 * (unbiased variance ~ 1): squares about a mean off by ~ULP change
        # it by ~ULP^2; what is left is float32 rounding of sums of O(1) terms, ~1e-6 relative
        torch.testing.assert_close(g["state"]["running_var"], state["running_var"],
                                   rtol=1e-5, atol=0)
