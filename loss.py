"""NT-Xent (normalized temperature-scaled cross entropy) loss of SimCLR, arXiv 2002.05709 (eq. 1),
with the negatives gathered from every rank when torch.distributed is running.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own rows summed over all ranks (plain
    dist.all_gather has no backward, which silently drops the other ranks' gradient)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)  # (world * rows, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's rows: sum their gradients
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def nt_xent(z1, z2, temperature=0.5, gather=True):
    """Mean NT-Xent loss over the 2N anchors of a batch: L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)].

    z1, z2: (N, d) projections of the two views of the same N images, any device and float dtype; the
    loss is computed in float32 (float64 stays float64), also under autocast. temperature: tau.
    gather: when torch.distributed is initialised with world > 1, each rank's anchors are scored against
    the 2N x world embeddings of all ranks; the gather passes gradients back to the rank that made them,
    so after DDP averages gradients, loss and gradients equal those of one process on the whole batch.
    """
    n = z1.shape[0]
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2N, d), row i and row i+N are positives
        rank, candidates = 0, z
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rank = dist.get_rank()
            candidates = GatherWithGrad.apply(z)  # (2N * world, d), rank r's rows at [2N r, 2N (r+1))
        logits = z @ candidates.T / temperature  # (2N, 2N * world): cosine similarity / tau
        logits.diagonal(2 * n * rank).fill_(float("-inf"))  # anchor i's own column, 2N rank + i: k != i
        partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n) + 2 * n * rank
        return F.cross_entropy(logits, partner)
