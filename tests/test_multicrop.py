"""Multi-crop (SwAV's small crops): the loss with several positives per image against a slow
reference and against nt_xent at two crops."""
import math

import pytest
import torch

from loss import multi_crop_nt_xent, nt_xent


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
