"""NT-Xent (normalized temperature-scaled cross entropy) loss of SimCLR, arXiv 2002.05709 (eq. 1),
with negatives gathered from every rank under torch.distributed; its multi-crop form (several
positives per image); and its gradient by gradient caching (Gao et al. 2021) for large batches."""
import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own rows summed over all ranks
    (plain dist.all_gather has no backward, which silently drops the other ranks' gradient)."""

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


def nt_xent(z1, z2, temperature=0.5, gather=True, monitors=False):
    """Mean NT-Xent loss over the 2N anchors of a batch (eq. 1):
    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)].

    z1, z2: (N, d) projections of the two views of the same N images, any device and float dtype;
    the loss is computed in float32 (float64 stays float64), also under autocast. temperature: tau.
    gather: when torch.distributed runs with world > 1, each rank's anchors are scored against the
    2N x world embeddings of all ranks; the gather passes gradients back to the rank that made them,
    so that after DDP averages gradients, loss and gradients are one process's on the whole batch.
    monitors: also return {"contrastive_top1", "spread"}, label-free health monitors (no graph, no
    host sync): the share of anchors whose most similar candidate is their positive (ties count
    1 / the number tied, so a constant z scores chance, 1 / (2N world - 1)); and the per-dimension
    standard deviation of the normalised z times sqrt(d): about 1 when the embeddings spread over
    the sphere, 0 when they collapse to a point.
    """
    n = z1.shape[0]
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        # (2N, d): rows i and i + N are the positive pairs
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)
        rank = 0
        candidates = z
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rank = dist.get_rank()
            candidates = GatherWithGrad.apply(z)  # (2N world, d): rank r's rows from 2N r on
        logits = z @ candidates.T / temperature  # (2N, 2N world): cosine similarity / tau
        # anchor i's own column, 2N rank + i, is no candidate: k != i in eq. 1
        logits.diagonal(2 * n * rank).fill_(float("-inf"))
        partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n) + 2 * n * rank  # (2N,)
        loss = F.cross_entropy(logits, partner)
        if not monitors:
            return loss
        with torch.no_grad():
            best = logits.max(1, keepdim=True).values  # (2N, 1)
            tied = (logits == best).sum(1)  # (2N,) candidates at the maximum
            hit = (logits.gather(1, partner[:, None]) == best)[:, 0]  # (2N,) the positive is one
            top1 = (hit.float() / tied).mean()
            spread = z.std(0).mean() * z.shape[1] ** 0.5
        return loss, {"contrastive_top1": top1, "spread": spread}


def multi_crop_nt_xent(z, crops, temperature=0.5, gather=True, monitors=False):
    """NT-Xent with several crops per image (multi-crop, SwAV arXiv 2006.09882, section 3.2): each
    pair of crops of an image is a positive pair, scored as eq. 1 scores SimCLR's one pair, against
    the same negatives: every crop of every other image (of every rank under torch.distributed).
    Mean over all C (C - 1) ordered pairs (a, p) of each image of

        l(a, p) = -log( exp(s_ap) / (exp(s_ap) + sum_{k of other images} exp(s_ak)) )

    s = cosine similarity / tau. The anchor's other positives are left out of its denominator:
    they neither push a away nor dilute the pair. With C = 2 this is nt_xent (the denominator is
    then every k != a), to float rounding.

    z: (C N, d), crop c of image i at row c N + i (the large views first); the loss in float32 (or
    float64). monitors: as nt_xent's, with a hit where the most similar other crop is one of the
    anchor's positives (ties shared)."""
    cn = z.shape[0]
    if crops < 2 or cn % crops:
        raise ValueError(f"{cn} rows are not {crops} (at least 2) crops of each image")
    n = cn // crops
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.to(dtype), dim=1)  # (C N, d)
        rank = 0
        candidates = z
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rank = dist.get_rank()
            candidates = GatherWithGrad.apply(z)  # (C N world, d): rank r's rows from C N r on
        logits = z @ candidates.T / temperature  # (C N, C N world)
        rows = torch.arange(cn, device=z.device)
        image = rows % n  # (C N,)
        crop = rows // n
        # (C N, C - 1): the columns of each anchor's positives, its image's other crops
        others = torch.stack([(crop + k) % crops for k in range(1, crops)], dim=1)
        positives = others * n + image[:, None] + cn * rank
        own = torch.zeros_like(logits, dtype=torch.bool)  # the anchor's own image's C columns
        own[:, cn * rank:cn * (rank + 1)] = image[:, None] == image[None, :]
        # log sum exp over the negatives, shared by the anchor's C - 1 pairs
        negatives = logits.masked_fill(own, float("-inf")).logsumexp(1)  # (C N,)
        positive = logits.gather(1, positives)  # (C N, C - 1)
        # -log(e^s / (e^s + e^neg)) = softplus(neg - s)
        loss = F.softplus(negatives[:, None] - positive).mean()
        if not monitors:
            return loss
        with torch.no_grad():
            others_logits = logits.clone()
            others_logits[rows, rows + cn * rank] = float("-inf")  # k != a
            best = others_logits.max(1, keepdim=True).values  # (C N, 1)
            tied = (others_logits == best).sum(1)  # (C N,)
            hits = (positive == best).sum(1)  # (C N,) positives among the tied maxima
            top1 = (hits.float() / tied).mean()
            spread = z.std(0).mean() * z.shape[1] ** 0.5
        return loss, {"contrastive_top1": top1, "spread": spread}


def cached_backward(net, views, scaler, dtype, temperature, m,
                    memory_format=torch.contiguous_format):
    """Gradient caching (Gao et al. 2021, arXiv 2101.06983): the gradients of 2 x NT-Xent over all
    2n views, scaled by `scaler` (a torch.amp.GradScaler), in .grad, with the activations of m
    images at a time. views: (2n, 3, S, S), the two views of image i at rows i and n + i;
    net(x) -> (h, z); dtype: autocast's, or None. A micro-batch holds both views of its images,
    rows i to i + m and n + i to n + i + m, so that its BN sees both, as a DDP rank's does.
    -> (loss, h without a graph, nt_xent's monitors)"""
    n = views.shape[0] // 2
    k = n // m  # micro-batches
    starts = range(0, n, m)

    def part(i):  # (2m, 3, S, S): a channels-last copy of the whole batch would hold 2n images
        both = torch.cat([views[i:i + m], views[n + i:n + i + m]])
        return both.contiguous(memory_format=memory_format)

    def autocast():
        return torch.autocast(views.device.type, dtype=dtype, enabled=dtype is not None)

    # 1. z without a graph. The BN running statistics and the RNG are put back, so that pass 3
    # updates the statistics once per micro-batch and draws what pass 1 drew.
    buffers = list(net.buffers())
    saved = [b.clone() for b in buffers]
    devices = [views.device] if views.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices), autocast():
        hs, zs = zip(*(net(part(i)) for i in starts))
    torch._foreach_copy_(buffers, saved)

    # 2. The loss over the whole batch (nt_xent gathers other ranks' z), its gradient at z (scaled)
    zc = torch.cat(zs).requires_grad_()  # (2n, d): micro-batch after micro-batch, [view 1; view 2]
    z = zc.view(k, 2, m, -1).transpose(0, 1).reshape(2 * n, -1)  # (2n, d) in the rows of `views`
    loss, monitors = nt_xent(z[:n], z[n:], temperature, monitors=True)
    grad, = torch.autograd.grad(scaler.scale(2 * loss), zc)  # (2n, d), micro-batch order

    # 3. Each micro-batch again with its graph, its slice of dL/dz backpropagated (DDP: reduce once)
    DDP = torch.nn.parallel.DistributedDataParallel
    ddp = next((mod for mod in net.modules() if isinstance(mod, DDP)), None)
    for j, (i, g) in enumerate(zip(starts, grad.split(2 * m))):
        last = j == k - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast():
                _, z_part = net(part(i))  # (2m, d)
            torch.autograd.backward(z_part, g)
    h = torch.cat(hs).view(k, 2, m, -1).transpose(0, 1).reshape(2 * n, -1)  # (2n, feat_dim)
    return loss, h, monitors
