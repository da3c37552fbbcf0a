"""LARS against the official update written out slowly (alone, and given a SimCLR's plain
parameters), the linear scaling of the rate, and the official loss scale."""
import json
import math

import torch
import torch.nn as nn

import train
from conftest import write_idx
from lars import LARS
from model import SimCLR


def official_lars(params, grads_per_step, lrs, momentum, weight_decay, eta, adapt):
    """google-research/simclr lars_optimizer.py, float64, one parameter at a time: g = grad + wd w
    (adapted params only), trust = eta ||w|| / ||g|| (1 where either norm is 0 or the param is not
    adapted), v = m v + lr trust g, w -= v."""
    ws = [p.detach().double().clone() for p in params]
    vs = [torch.zeros_like(w) for w in ws]
    for grads, lr in zip(grads_per_step, lrs):
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.double()
            trust = 1.0
            if adapt[i]:
                g = g + weight_decay * w
                wn, gn = w.norm().item(), g.norm().item()
                trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
            vs[i] = momentum * vs[i] + lr * trust * g
            ws[i] = w - vs[i]
    return ws


def test_lars_matches_the_official_update_with_warmup_momentum_and_weight_decay():
    """Five steps whose rate rises (warmup) then falls: the official classic momentum keeps each
    step's rate with its gradient, so a rate folded in after the buffer (v = m v + g; w -= lr v)
    would differ from step 2 on."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(8, 4, generator=gen, dtype=torch.float64))
    b = nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))
    opt = LARS([w, b], lr=1.0, momentum=0.9, weight_decay=0.1, eta=0.001)  # plain parameters
    lrs = [train.lr_at(s, 2.0, 3, 5) for s in range(5)]  # 0, 0.67, 1.33, then 2.0 and cosine
    grads = [[torch.randn(8, 4, generator=gen, dtype=torch.float64),
              torch.randn(8, generator=gen, dtype=torch.float64)]
             for _ in range(5)]
    ref = official_lars([w, b], grads, lrs, 0.9, 0.1, 0.001, adapt=[True, False])
    for lr, (gw, gb) in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # float64 and the same operations per element; foreach norms sum in another order:
    # ~1e-15 relative
    torch.testing.assert_close(w.detach(), ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), ref[1], rtol=1e-12, atol=1e-12)


def test_lars_given_a_models_plain_parameters_leaves_biases_and_bn_out():
    """LARS(model.parameters()) as a copier writes it, on a SimCLR network: three steps against the
    official update, whose excluded set is found here by module (every BN's weight and bias, the
    output BN's scale, every bias), not by shape as LARS finds it. Adapting BN or biases (weight
    decay or the trust ratio) moves them by far more than the tolerance."""
    torch.manual_seed(0)
    model = SimCLR("resnet18", proj_dim=16, cifar_stem=True, width=0.125).double()
    excluded = {id(model.projector.scale)}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            excluded |= {id(module.weight), id(module.bias)}
        if getattr(module, "bias", None) is not None:
            excluded.add(id(module.bias))
    params = list(model.parameters())
    assert 0 < len(excluded) < len(params)
    with torch.no_grad():  # BN's weights start at 1 or 0 and its biases at 0: give them a spread
        for p in params:
            if id(p) in excluded:
                p.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
             for _ in range(3)]
    lrs = [0.5, 1.0, 0.25]
    ref = official_lars(params, grads, lrs, 0.9, 0.1, 0.001,
                        adapt=[id(p) not in excluded for p in params])
    opt = LARS(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1, eta=0.001)
    for lr, step_grads in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    # float64, as the first test
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)


def test_train_py_gives_lars_every_parameter():
    model = SimCLR("resnet18", proj_dim=16, cifar_stem=True, width=0.125)
    args = train.resolve_args(train.get_args_parser().parse_args(
        ["--dataset", "cifar10", "--weight-decay", "1e-4"]))
    opt = train.build_optimizer(model, args, 0.5)
    assert isinstance(opt, LARS) and opt.param_groups[0]["weight_decay"] == 1e-4
    assert [id(p) for g in opt.param_groups for p in g["params"]] == [
        id(p) for p in model.parameters()]


def test_the_peak_rate_is_lr_times_batch_over_256(tmp_path):
    data = str(write_idx(tmp_path / "fm", n_train=40, n_test=10))
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "fashion-mnist", "--data-dir", data, "--arch", "resnet18", "--width", "0.125",
         "--batch-size", "16", "--lr", "0.3", "--warmup-epochs", "0", "--max-steps", "2",
         "--log-every", "1", "--amp", "off", "--no-aug-compile", "--output-dir", str(out)]))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # step 0 of a cosine without warmup: the peak
    assert math.isclose(rows[0]["lr"], 0.3 * 16 / 256)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 4)

    def forward(self, x):
        h = x.flatten(1)  # (2n, 12)
        return h, self.proj(h)


def official_objective(z, tau):
    """google-research/simclr objective.py add_contrastive_loss, float64, written out as it is
    there: hidden1, hidden2 the two views' z, L2-normalised; logits_aa = h1 h1^T / tau and
    logits_bb = h2 h2^T / tau with their diagonal (each anchor itself) pushed down by LARGE_NUM
    through a one-hot mask; logits_ab = h1 h2^T / tau and logits_ba = h2 h1^T / tau; loss_a = the
    mean over the N rows of the softmax cross-entropy of [logits_ab, logits_aa] with label i (the
    partner), loss_b the same of [logits_ba, logits_bb]. -> (loss_a, loss_b)"""
    large_num = 1e9
    hidden = z.double()
    hidden = hidden / hidden.pow(2).sum(1, keepdim=True).sqrt()  # tf.math.l2_normalize
    n = hidden.shape[0] // 2
    hidden1, hidden2 = hidden[:n], hidden[n:]
    labels = torch.eye(n, 2 * n, dtype=torch.float64)  # one_hot(range(N), 2N)
    masks = torch.eye(n, dtype=torch.float64)  # one_hot(range(N), N)
    logits_aa = hidden1 @ hidden1.T / tau - masks * large_num
    logits_bb = hidden2 @ hidden2.T / tau - masks * large_num
    logits_ab = hidden1 @ hidden2.T / tau
    logits_ba = hidden2 @ hidden1.T / tau

    def softmax_cross_entropy(onehot, logits):  # tf.compat.v1.losses: the mean over the rows
        log_softmax = logits - logits.exp().sum(1, keepdim=True).log()  # logits <= 1 / tau
        return -(onehot * log_softmax).sum(1).mean()
    loss_a = softmax_cross_entropy(labels, torch.cat([logits_ab, logits_aa], 1))
    loss_b = softmax_cross_entropy(labels, torch.cat([logits_ba, logits_bb], 1))
    return loss_a, loss_b


def test_the_step_follows_the_official_loss_scale():
    """train_step's plain SGD step is -lr times the gradient of the official objective loss_a +
    loss_b (computed here in float64 from the official formula, not from nt_xent); the loss it logs
    is the paper's mean over the 2N anchors, (loss_a + loss_b) / 2. A step on the mean alone (half
    the official gradient) moves each parameter by half as much."""
    torch.manual_seed(0)
    net, views = Tiny(), torch.randn(8, 3, 2, 2)
    lr, tau = 0.5, 0.5
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    weight, bias = (p.detach().double().requires_grad_() for p in (net.proj.weight, net.proj.bias))
    before = (weight.detach().clone(), bias.detach().clone())
    z = views.double().flatten(1) @ weight.T + bias  # Tiny's forward in float64
    loss_a, loss_b = official_objective(z, tau)
    grads = torch.autograd.grad(loss_a + loss_b, (weight, bias))
    args = train.get_args_parser().parse_args(["--temperature", str(tau), "--no-channels-last"])
    loss, _, _ = train.train_step(net, views, opt, scaler, None, args)
    # float32 forward, loss and backward (eps 1.2e-7) on logits <= 1 / tau = 2 and gradients <= 3,
    # then one float32 rounding of the step on parameters <= 2 (ulp 1.2e-7): measured 2.3e-7;
    # 1e-6 is 1e4 times below the half step (lr g / 2 >= 0.01 on every bias) that a step on the
    # mean alone would miss
    for p, b, g in zip((net.proj.weight, net.proj.bias), before, grads):
        torch.testing.assert_close(p.detach().double(), b - lr * g, rtol=0, atol=1e-6)
    assert grads[1].abs().min() > 0.04  # every bias's gradient is large enough for the test to tell
    # the logged loss is the paper's mean: float32 values ~2 (ulp 2.4e-7), a few roundings
    torch.testing.assert_close(loss.double(), ((loss_a + loss_b) / 2).detach(), rtol=0, atol=1e-6)
