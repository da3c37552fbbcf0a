"""LARS (You et al. 2017, arXiv 1708.03888), the optimiser of SimCLR (arXiv 2002.05709), as the
official code's lars_optimizer.py: biases and BN parameters (every 1-D parameter) are excluded by
the optimiser itself, so that `LARS(model.parameters(), lr)` is right when copied alone."""
import torch


class LARS(torch.optim.Optimizer):
    """For each weight w with gradient grad (ndim > 1: conv and linear weights):
        g = grad + weight_decay w                    # the decay joins the gradient
        trust = eta ||w|| / ||g||  (1 where either norm is 0)
        v = momentum v + lr trust g;  w -= v         # classic momentum, the rate inside
    Biases and BN parameters (ndim <= 1) take v = momentum v + lr grad: neither weight decay nor the
    trust ratio (the official code excludes them by name: the same set). Foreach kernels: one
    launch per op for all the tensors of a group."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS takes lr, momentum, weight_decay >= 0 and eta > 0, got lr "
                             f"{lr}, momentum {momentum}, weight_decay {weight_decay}, eta {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            weights = [p for p in params if p.ndim > 1]
            others = [p for p in params if p.ndim <= 1]  # biases and BN: a plain momentum step
            steps = {}
            if weights:
                grads = [p.grad for p in weights]
                grads = torch._foreach_add(grads, weights, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(weights))  # (L,)
                g_norm = torch.stack(torch._foreach_norm(grads))  # (L,)
                ratio = group["eta"] * w_norm / g_norm
                trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)  # (L,)
                torch._foreach_mul_(grads, list(trust.unbind()))
                steps.update(zip(weights, grads))
            steps.update((p, p.grad) for p in others)
            if not steps:
                continue
            params = list(steps)
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, list(steps.values()), alpha=group["lr"])  # v = m v + lr g
            torch._foreach_sub_(params, bufs)  # w -= v
        return loss
