"""LARS against the official update written out slowly, the optimiser's parameter groups, the linear
scaling of the rate, and the official loss scale."""
import json
import math

import torch
import torch.nn as nn

import train
from conftest import write_idx
from loss import nt_xent


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
    opt = train.LARS([dict(params=[w]), dict(params=[b], weight_decay=0.0, lars=False)], lr=1.0,
                     momentum=0.9, weight_decay=0.1, eta=0.001)
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


def test_optimizer_groups_biases_and_bn_apart():
    model = train.SimCLR("resnet18", proj_dim=16, cifar_stem=True, width=0.125)
    args = train.resolve_args(train.get_args_parser().parse_args(
        ["--dataset", "cifar10", "--weight-decay", "1e-4"]))
    opt = train.build_optimizer(model, args, 0.5)
    decay, rest = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["lars"] and decay["weight_decay"] == 1e-4 and decay["lr"] == 0.5
    assert not rest["lars"] and rest["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in rest["params"])
    rest_names = {names[id(p)] for p in rest["params"]}
    assert "projector.scale" in rest_names and any(n.endswith("bn1.weight") for n in rest_names)
    assert any(n.endswith(".bias") for n in rest_names)
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


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


def test_the_step_follows_the_official_loss_scale():
    """The official objective is loss_a + loss_b: twice the mean over 2N anchors that nt_xent
    returns."""
    torch.manual_seed(0)
    net, views = Tiny(), torch.randn(8, 3, 2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = net.proj.bias.detach().clone()
    _, z = net(views)
    grad, = torch.autograd.grad(2 * nt_xent(z[:4], z[4:], 0.5), net.proj.bias)
    args = train.get_args_parser().parse_args(["--temperature", "0.5", "--no-channels-last"])
    loss, _, _ = train.train_step(net, views, opt, scaler, None, args)
    torch.testing.assert_close(net.proj.bias.detach(), before - grad)
    # the logged loss is the paper's mean
    torch.testing.assert_close(loss, nt_xent(z[:4], z[4:], 0.5).detach())
