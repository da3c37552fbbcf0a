import ast
import math
import os
import sys

import pytest
import torch

from loss import nt_xent


def reference(z1, z2, tau):
    """The paper's formula, float64, slow and obvious: views interleaved as (2k-1, 2k), 1-based."""
    zs = []
    for a, b in zip(z1, z2):
        zs += [a, b]
    zs = [z / z.norm() for z in zs]
    two_n = len(zs)

    def sim(i, j):
        return (zs[i] * zs[j]).sum()

    def l(i, j):
        den = sum(torch.exp(sim(i, k) / tau) for k in range(two_n) if k != i)
        return -torch.log(torch.exp(sim(i, j) / tau) / den)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(two_n // 2)) / two_n


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_matches_float64_reference_values_and_gradients(n, tau):
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, 8, dtype=torch.float64, generator=g, requires_grad=True)
    z2 = torch.randn(n, 8, dtype=torch.float64, generator=g, requires_grad=True)
    fast = nt_xent(z1, z2, tau)
    g_fast = torch.autograd.grad(fast, (z1, z2))
    slow = reference(z1, z2, tau)
    g_slow = torch.autograd.grad(slow, (z1, z2))
    assert fast.dtype == torch.float64
    # float64 both ways (eps 1.1e-16): losses <= 13 (ulp 1.8e-15) and
    # gradients <= 2 through ~100 ops summed in another order:
    # ~1e-13 -> 1e-12 (measured 4e-16 and 9e-16). A float32 step inside would be off by ~1e-7.
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_symmetric_in_the_views():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    torch.testing.assert_close(nt_xent(z1, z2, 0.3), nt_xent(z2, z1, 0.3))


@pytest.mark.parametrize("n", [1, 3, 64])
def test_identical_embeddings_give_log_2n_minus_1(n):
    z = torch.ones(n, 5, dtype=torch.float64)
    # float64: logsumexp of 2n - 1 equal logits 2 minus 2, values <= 7 (ulp 8.9e-16), a few
    # roundings -> 1e-12
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log(2 * n - 1), abs=1e-12)


def test_scale_invariant_and_lower_for_matching_views():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=g)
    torch.testing.assert_close(nt_xent(z1, 3 * z1), nt_xent(z1, z1))
    assert (nt_xent(z1, z1 + 0.01 * torch.randn(32, 16, generator=g))
            < nt_xent(z1, torch.randn(32, 16, generator=g)))


def test_float32_under_autocast_and_half_inputs_without_overflow():
    g = torch.Generator().manual_seed(0)
    z1 = (torch.randn(64, 32, generator=g) * 1e3).to(torch.bfloat16)
    z2 = (torch.randn(64, 32, generator=g) * 1e3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z1, z2, 0.01)  # large logits (100) that would overflow fp16's exp
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = nt_xent(z1.float(), z2.float(), 0.01)
    torch.testing.assert_close(loss, ref)
    half = nt_xent(z1.to(torch.float16), z2.to(torch.float16), 0.01)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_loss_py_imports_no_sibling():
    """loss.py, gradient caching included, can be copied into another project alone."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    siblings = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    tree = ast.parse(open(os.path.join(root, "loss.py")).read())
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    foreign = {n for n in names
               if n not in sys.stdlib_module_names and n not in {"torch", "torchvision", "numpy"}}
    assert not names & siblings and not foreign, names


# ------------------------------------------------------------------------------ label-free monitors

def reference_monitors(z1, z2):
    """float64, slow and obvious: each anchor's most similar other view (a tie shared among the
    tied), and the spread: per dimension j, the unbiased standard deviation of the normalised
    embeddings' column j (two passes: its mean, then the squared deviations summed, over 2N - 1),
    the mean of those d standard deviations, times sqrt(d). Python floats throughout, no torch
    reduction."""
    rows = [[float(v) for v in row] for row in torch.cat([z1, z2]).double()]
    rows = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]
    z = torch.tensor(rows, dtype=torch.float64)
    two_n, d = len(rows), len(rows[0])
    n = two_n // 2
    hits = 0.0
    for i in range(two_n):
        sims = [(z[i] @ z[k]).item() for k in range(two_n) if k != i]
        others = [k for k in range(two_n) if k != i]
        best = max(sims)
        tied = [k for k, s in zip(others, sims) if s == best]
        hits += ((i + n) % two_n in tied) / len(tied)
    stds = []
    for j in range(d):
        column = [row[j] for row in rows]
        mean = sum(column) / two_n
        variance = sum((v - mean) ** 2 for v in column) / (two_n - 1)
        stds.append(math.sqrt(variance))
    return hits / two_n, sum(stds) / d * math.sqrt(d)


@pytest.mark.parametrize("n,tau", [(8, 0.5), (16, 0.1)])
def test_monitors_match_the_reference(n, tau):
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, 8, generator=g, dtype=torch.float64)
    # positives closer than chance
    z2 = z1 + 1.2 * torch.randn(n, 8, generator=g, dtype=torch.float64)
    loss, monitors = nt_xent(z1, z2, tau, monitors=True)
    top1, spread = reference_monitors(z1, z2)
    assert 0 < top1 < 1  # some anchors find their positive, some not: the test can tell them apart
    assert monitors["contrastive_top1"].item() == pytest.approx(top1, abs=1e-12)
    # float64 both ways, sums of <= 32 terms in another order (eps 1.1e-16 each): ~1e-15 relative;
    # a biased std would be off by 1 - sqrt(1 - 1 / 2N) >= 1.6%, a missing sqrt(d) by 2.8x
    assert monitors["spread"].item() == pytest.approx(spread, rel=1e-12)
    # the loss is the same with or without them
    torch.testing.assert_close(loss, nt_xent(z1, z2, tau))


def test_a_collapsed_batch_scores_zero_spread_and_chance_top1():
    n = 8
    z = torch.ones(n, 16)  # every view the same point
    _, monitors = nt_xent(z, z.clone(), 0.5, monitors=True)
    assert monitors["spread"].item() == 0.0
    # each of 2N - 1 tied
    assert monitors["contrastive_top1"].item() == pytest.approx(1 / (2 * n - 1))


def test_identical_views_find_every_positive():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 16, generator=g)
    _, monitors = nt_xent(z, z.clone(), 0.5, monitors=True)
    assert monitors["contrastive_top1"].item() == 1.0
    # 64 points, two copies of 32 directions in 16 dimensions: spread near 1
    # (0.8-1.1 for such samples)
    assert 0.8 < monitors["spread"].item() < 1.2
