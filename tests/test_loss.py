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
    # float64 both ways (eps 1.1e-16): losses <= 13 (ulp 1.8e-15) and gradients <= 2 through ~100 ops summed in
    # another order: ~1e-13 -> 1e-12 (measured 4e-16 and 9e-16). A float32 step inside would be off by ~1e-7.
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
    # float64: logsumexp of 2n - 1 equal logits 2 minus 2, values <= 7 (ulp 8.9e-16), a few roundings -> 1e-12
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log(2 * n - 1), abs=1e-12)


def test_scale_invariant_and_lower_for_matching_views():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=g)
    torch.testing.assert_close(nt_xent(z1, 3 * z1), nt_xent(z1, z1))
    assert nt_xent(z1, z1 + 0.01 * torch.randn(32, 16, generator=g)) < nt_xent(z1, torch.randn(32, 16, generator=g))


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
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    foreign = {n for n in names if n not in sys.stdlib_module_names and n not in {"torch", "torchvision", "numpy"}}
    assert not names & siblings and not foreign, names
