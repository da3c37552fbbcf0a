"""Evaluation of SimCLR encoders (arXiv 2002.05709): linear evaluation on frozen features (an L2-regularised
logistic regression, its weight decay chosen on held-out training images), kNN, and fine-tuning the whole network
with labels against the same network from random weights (the paper's ablation), at several label fractions.
"""
import argparse
import copy
import json
import math
import os
import time
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from augment import BatchAugment, eval_batch
from data import DATASETS, DatasetError, get_dataset, labels, uint8_images
from harness import (Parser, amp_dtype, at_least, check_device, checked, die, load_checkpoint, load_model_state,
                     make_writable_dir, ordered_pair, positive_float, positive_int, probability,
                     save_checkpoint, save_json)
from model import ARCHS, SimCLR

MODEL_ARGS = ("arch", "width", "cifar_stem", "stem_stride", "proj_dim", "proj_layers", "proj_out_bn")  # what a checkpoint's weights depend on
label_fraction = checked(float, lambda f: 0 < f <= 1, "takes label fractions in (0, 1]")
WEIGHT_DECAYS = [10.0 ** e for e in range(-6, -1)]  # grid for the logistic regression, per sample
PATH_ITERS = 50  # L-BFGS iterations per weight decay while choosing it (warm-started path)


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR evaluation", add_help=False)
    g = p.add_argument_group("encoders")
    g.add_argument("--ckpt", nargs="*", default=[], help="train.py checkpoints (last.pt), one or several")
    g.add_argument("--random-init", action="store_true",
                   help="also evaluate the same network with random weights, the baseline")
    g.add_argument("--pixels", action="store_true", help="also evaluate the raw pixels as features")
    g.add_argument("--arch", default="resnet18", choices=ARCHS, help="random init without --ckpt (default: %(default)s)")
    g.add_argument("--width", type=positive_float, default=1.0, help="random init without --ckpt (default: %(default)s)")
    g.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="random init without --ckpt (default: on for images of 64 px or less)")
    g.add_argument("--stem-stride", type=int, default=1, choices=(1, 2),
                   help="random init without --ckpt (default: %(default)s)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="(default: the checkpoint's; STL-10 trains on its 5k labelled images, tests on its 8k)")
    g.add_argument("--data-dir", default=None, help="dataset root (default: the checkpoint's)")
    g.add_argument("--image-size", type=positive_int, default=None, help="(default: the checkpoint's, else the dataset's)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="let torchvision download a missing dataset (default: %(default)s)")
    g.add_argument("--max-train-samples", type=positive_int, default=None,
                   help="N training images drawn at random with --seed, for quick checks (default: all)")
    g.add_argument("--max-test-samples", type=positive_int, default=None,
                   help="N test (or validation) images drawn at random with --seed, for quick checks (default: all)")
    g.add_argument("--eval-on", default="test", choices=("test", "val"),
                   help="val: hold out --val-fraction of the training split (class-balanced, fixed by --val-seed), "
                        "train on the rest and report on it; the test split is never read. Choose every "
                        "hyperparameter on val, then read test once per reported run (default: %(default)s)")
    g.add_argument("--val-fraction", type=checked(float, lambda f: 0 < f < 1, "takes a fraction in (0, 1)"),
                   default=0.1, help="(default: %(default)s)")
    g.add_argument("--val-seed", type=int, default=0,
                   help="draws the validation images; fixed, so every run and seed sees the same (default: %(default)s)")
    g = p.add_argument_group("protocols")
    g.add_argument("--protocol", nargs="+", default=["linear"], choices=("linear", "knn", "finetune", "distill"),
                   help="linear: logistic regression on frozen features; knn: k nearest neighbours (cosine, "
                        "temperature-weighted votes); finetune: the whole network with labels, test accuracy "
                        "along the way; distill: SimCLRv2's third step, a student trained on every training image "
                        "without labels from the fine-tuned network's predictions (default: %(default)s)")
    g.add_argument("--label-fraction", nargs="+", type=label_fraction, default=[1.0],
                   help="class-balanced fractions of the training labels, e.g. 0.01 0.1 1.0 (default: %(default)s)")
    g.add_argument("--solver", default="lbfgs", choices=("lbfgs", "sgd"),
                   help="linear: full-batch L-BFGS (the paper's protocol for linear transfer) or SGD with momentum "
                        "and cosine decay over --epochs (default: %(default)s)")
    g.add_argument("--weight-decay", nargs="+", type=at_least(0, float), default=WEIGHT_DECAYS,
                   help="linear: L2 penalties to choose from on 10%% of the training split held out; one value "
                        "skips the choice (default: 1e-6 ... 1e-2)")
    g.add_argument("--epochs", type=positive_int, default=100, help="linear with --solver sgd (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=256, help="linear sgd and finetune (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=0.1, help="linear sgd learning rate (default: %(default)s)")
    g.add_argument("--knn-k", type=positive_int, default=200, help="(default: %(default)s)")
    g.add_argument("--knn-t", type=positive_float, default=0.07, help="vote temperature (default: %(default)s)")
    g.add_argument("--finetune-epochs", nargs="+", type=positive_int, default=[10],
                   help="one value, or one per --finetune-label-fraction (SimCLRv2: 60 at 1%%, 30 at 10%%) "
                        "(default: %(default)s)")
    g.add_argument("--finetune-label-fraction", nargs="+", type=label_fraction, default=None,
                   help="label fractions to fine-tune at (default: those of --label-fraction)")
    g.add_argument("--finetune-lr", nargs="+", type=positive_float, default=[0.05],
                   help="Nesterov SGD base rate per 256 images, cosine decay; several values are each run and "
                        "reported, to choose one on --eval-on val (default: %(default)s)")
    g.add_argument("--finetune-head-layers", nargs="+", type=at_least(0), default=[0],
                   help="fine-tune from inside the projection head: keep its first K layers (linear, BN, ReLU) "
                        "under the classifier; SimCLRv2 keeps 1 of its 3; 0: from the encoder; several values are "
                        "each run; the random-init network uses 0 (default: %(default)s)")
    g.add_argument("--finetune-lr-random", nargs="+", type=positive_float, default=None,
                   help="the same for the random-init network, which gets its own rate (default: --finetune-lr)")
    g.add_argument("--finetune-weight-decay", type=at_least(0, float), default=0.0,
                   help="(default: %(default)s, the paper's fine-tuning, appendix B.5)")
    g.add_argument("--finetune-crop-scale", type=float, nargs=2, default=(0.08, 1.0), action=ordered_pair(0, 1),
                   help="area range of the fine-tuning crop; flips too, no colour (default: %(default)s, the "
                        "standard inception crop of the paper's fine-tuning)")
    g.add_argument("--save-finetuned", action="store_true",
                   help="write each fine-tuned and distilled network to OUTPUT_DIR (default: %(default)s)")
    g = p.add_argument_group("distillation (SimCLRv2, arXiv 2006.10029)")
    g.add_argument("--distill-epochs", type=positive_int, default=2, help="(default: %(default)s)")
    g.add_argument("--distill-tau", type=positive_float, default=1.0,
                   help="temperature of the teacher's and the student's softmax (default: %(default)s, SimCLRv2's)")
    g.add_argument("--distill-alpha", type=probability, default=1.0,
                   help="weight of the distillation loss; 1 - alpha weighs the labelled loss on the labelled "
                        "images (default: %(default)s: labels unused, as SimCLRv2's ImageNet students)")
    g.add_argument("--distill-lr", type=positive_float, default=None,
                   help="student's base rate per 256 images (default: the teacher's fine-tuning rate)")
    g.add_argument("--distill-init", default="pretrained", choices=("pretrained", "random"),
                   help="the student starts from the pretrained SimCLR weights (with a new classifier) or from "
                        "random weights (default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    g.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"),
                   help="autocast dtype of feature extraction and fine-tuning (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--output-dir", default=None,
                   help="where results and plots go (default: beside the first checkpoint, else runs/eval)")
    g.add_argument("--wall-start", type=float, default=None,
                   help="Unix time the whole job began (make demo passes it): 'seconds' is then the wall time "
                        "since, instead of pretraining + evaluation time")
    return p


# ------------------------------------------------------------------------------------------------- encoders

def load_encoders(args):
    """[(name, SimCLR model or None for pixels, its train args)]"""
    encoders = []
    for i, path in enumerate(args.ckpt):
        ckpt = load_checkpoint(path)
        a = dict(ckpt["args"], train_seconds=ckpt.get("train_seconds", 0.0))
        model = SimCLR.from_args(a)
        load_model_state(model, ckpt, path, MODEL_ARGS)
        layers, deepest = len(model.projector.dims) - 1, max(args.finetune_head_layers)
        if {"finetune", "distill"} & set(args.protocol) and deepest >= layers:
            die(f"--finetune-head-layers {deepest}: {path} has a projection head of {layers} layers, so fine-tuning "
                f"can keep 0 to {layers - 1} of them (train with --proj-layers 3 for SimCLRv2's head)")
        name = "simclr" if len(args.ckpt) == 1 else os.path.basename(os.path.dirname(os.path.abspath(path))) or str(i)
        encoders.append((name, model, a))
    first = encoders[0][2] if encoders else {}
    if args.random_init:
        a = dict(first) if first else {}
        if not first:
            size = args.image_size or DATASETS[args.dataset]["size"]
            a = dict(arch=args.arch, width=args.width, stem_stride=args.stem_stride, proj_dim=128, image_size=size,
                     cifar_stem=size <= 64 if args.cifar_stem is None else args.cifar_stem)
        torch.manual_seed(args.seed)
        # torchvision's default init: every residual branch contributes (zero init would leave each block the
        # identity); its BN statistics are estimated on the training images in main, before any probe
        model = SimCLR.from_args(a, zero_init_residual=False)
        encoders.append(("random", model, dict(a, train_seconds=0.0)))
    if args.pixels:
        encoders.append(("pixels", None, dict(first, arch="pixels", train_seconds=0.0)))
    if not encoders:
        die("nothing to evaluate: pass --ckpt PATH (a last.pt of train.py), --random-init or --pixels")
    return encoders


# ------------------------------------------------------------------------------------------------ protocols

@torch.no_grad()
def extract_features(encoder, images, size, mean, std, device, batch_size=512, desc="features", dtype=None):
    """(N, d) float32 features of `encoder` (None: the normalised pixels) on uint8 images, no augmentation;
    dtype: autocast dtype of the forward pass (None: float32)."""
    feats = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, dynamic_ncols=True, disable=None):
        x = eval_batch(images[i:i + batch_size].to(device), size, mean, std)
        if encoder is None:
            feats.append(x[:, :images.shape[1]].flatten(1).cpu())  # (B, C S^2): the pixels, in their own channels
        else:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                feats.append(encoder(x.contiguous(memory_format=torch.channels_last)).float().cpu())  # (B, d)
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(xtr, ytr, xte, classes, k=200, t=0.07, chunk=1024):
    """Class scores of a weighted kNN (InstDisc): cosine similarity, the k nearest vote with exp(sim / t)."""
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    k = min(k, len(xtr))
    scores = []
    for i in range(0, len(xte), chunk):
        sim, idx = (xte[i:i + chunk] @ xtr.T).topk(k, dim=1)  # (b, k) of the (b, N_train) similarities
        votes = torch.zeros(len(sim), classes, device=xte.device)
        scores.append(votes.scatter_add_(1, ytr[idx], (sim / t).exp()))  # (b, classes)
    return torch.cat(scores)


def knn_monitor(encoder, data, args, device, dtype=None):
    """train.py --probe: kNN top-1 (%) of the encoder's features, in eval mode (its BN statistics untouched)."""
    xtr, ytr, xte, yte = data
    info = DATASETS[args.dataset]
    encoder.eval()
    kw = dict(desc="kNN features", dtype=dtype)
    ftr = extract_features(encoder, xtr, args.image_size, info["mean"], info["std"], device, **kw)
    fte = extract_features(encoder, xte, args.image_size, info["mean"], info["std"], device, **kw)
    encoder.train()
    scores = knn_predict(ftr, ytr, fte, int(max(ytr.max(), yte.max())) + 1)
    return round((scores.argmax(1) == yte).float().mean().item() * 100, 2)


def knn_monitor_data(args):
    """train.py --probe: (train images, labels, test images, labels) of --knn-samples random images, or None
    where the data has no labels."""
    try:
        train_set = get_dataset(args.dataset, args.data_dir, "train", download=False)
        test_set = get_dataset(args.dataset, args.data_dir, "test", download=False)
    except DatasetError as e:
        print(f"note: no kNN monitor ({e})")
        return None
    (xtr, ytr), (xte, yte) = uint8_images(train_set, args.image_size), uint8_images(test_set, args.image_size)
    g = torch.Generator().manual_seed(args.seed)
    pick_tr = torch.randperm(len(ytr), generator=g)[:args.knn_samples[0]]
    pick_te = torch.randperm(len(yte), generator=g)[:args.knn_samples[1]]
    return xtr[pick_tr], ytr[pick_tr], xte[pick_te], yte[pick_te]


def build_monitors(args, base, model, rank, device):
    """train.py --probe: (online probe, kNN monitor data), else (None, None)."""
    if not args.probe:
        return None, None
    classes = DATASETS[args.dataset]["num_classes"] or int(labels(base).max()) + 1
    probe = OnlineProbe(model.feat_dim, classes, device) if classes > 0 else None
    knn = knn_monitor_data(args) if rank == 0 and args.knn_every > 0 else None
    return probe, knn


class OnlineProbe:
    """A linear classifier trained alongside pretraining on the detached features h of the labelled images of
    each batch (label -1: skipped), with its own optimiser: it never touches the encoder's gradients."""

    def __init__(self, feat_dim, classes, device):
        self.head = nn.Linear(feat_dim, classes).to(device)
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=1e-3, weight_decay=1e-4)
        self.correct, self.seen = torch.zeros((), device=device), torch.zeros((), device=device)

    def step(self, h, y):
        keep = (y >= 0).float()  # weights, not a boolean index: no host sync
        logits = self.head(h.float())  # (2n, classes)
        loss = (F.cross_entropy(logits, y.clamp(min=0), reduction="none") * keep).sum() / keep.sum().clamp(min=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.correct += ((logits.argmax(1) == y).float() * keep).sum().detach()
        self.seen += keep.sum()

    def accuracy(self, world):
        """Top-1 (%) on the training views since the last call, over all ranks; None without labels."""
        counts = torch.stack([self.correct, self.seen])
        if world > 1:
            dist.all_reduce(counts)
        self.correct.zero_(), self.seen.zero_()
        correct, seen = counts.tolist()
        return round(100 * correct / seen, 2) if seen else None

    def state_dict(self):
        return {"head": self.head.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])


def random_subset(n, k, seed):
    """Indices of k of n items drawn with the seed, in their order (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def balanced_subset(labels, fraction, seed):
    """Indices of a class-balanced subset: round(fraction * n_c) (at least 1) images of each class c."""
    if fraction >= 1:
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero()[:, 0]
        k = max(1, round(fraction * len(idx)))
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picks).sort().values


def fit_logistic(x, y, classes, weight_decay, solver="lbfgs", epochs=100, lr=0.1, batch_size=256, seed=0, init=None,
                 max_iter=200):
    """Multinomial logistic regression: mean cross-entropy + weight_decay / 2 * ||W||^2. -> nn.Linear"""
    clf = torch.nn.Linear(x.shape[1], classes).to(x.device)
    if init is not None:
        clf.load_state_dict(init.state_dict())
    else:
        torch.nn.init.zeros_(clf.weight), torch.nn.init.zeros_(clf.bias)
    if solver == "lbfgs":
        opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                                tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(clf(x), y) + weight_decay / 2 * clf.weight.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return clf
    gen = torch.Generator().manual_seed(seed)
    steps = max(1, x.shape[0] // batch_size)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx]) + weight_decay / 2 * clf.weight.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


def linear_probe(xtr, ytr, xte, classes, args):
    """Standardise with the training statistics, choose the weight decay on 10% of the training images held
    out, refit on all of them, score the test set. -> (logits of the test set, chosen weight decay)
    The choice walks the regularisation path from the strongest decay down, each fit warm-started from the
    previous one (as glmnet does), so PATH_ITERS L-BFGS iterations per decay are enough to rank them; the refit
    runs the full 200."""
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    kw = dict(solver=args.solver, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    decays, init = sorted(args.weight_decay, reverse=True), None
    best = decays[0]
    if len(decays) > 1:
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(args.seed))
        n_val = max(1, len(ytr) // 10)
        val, fit = perm[:n_val], perm[n_val:]
        scores, fits = [], []
        for wd in decays:  # strongest first, each fit warm-started from the previous one
            init = fit_logistic(xtr[fit], ytr[fit], classes, wd, init=init, max_iter=PATH_ITERS, **kw)
            fits.append(init)
            with torch.no_grad():
                scores.append((init(xtr[val]).argmax(1) == ytr[val]).float().mean().item())
        i = max(range(len(decays)), key=lambda i: (scores[i], -i))
        best, init = decays[i], fits[i]
    clf = fit_logistic(xtr, ytr, classes, best, init=init, **kw)  # all the training images, warm-started
    with torch.no_grad():
        return clf(xte), best


@torch.no_grad()
def fit_bn_statistics(encoder, images, size, mean, std, device, dtype, batch_size=512):
    """BN running statistics of `encoder` as the averages over `images` (no labels, no gradients): a forward pass in
    train mode with a cumulative moving average (momentum None), then eval mode."""
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    encoder.train()
    for i in range(0, len(images), batch_size):
        x = eval_batch(images[i:i + batch_size].to(device), size, mean, std)  # (B, 3, S, S)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            encoder(x.contiguous(memory_format=torch.channels_last))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return encoder.eval()


def supervised_net(model, head_layers, classes):
    """A copy of the encoder and of the head's first `head_layers` layers, under a new linear classifier: the
    network that fine-tuning and distillation train (SimCLRv2 keeps one layer of its head; 0 keeps none)."""
    head = model.projector.first_layers(head_layers)
    return nn.Sequential(OrderedDict(encoder=copy.deepcopy(model.encoder), head=copy.deepcopy(head),
                                     classifier=nn.Linear(model.projector.dims[head_layers], classes)))


def train_net(net, images, loss_fn, data, args, device, epochs, lr, desc):
    """Nesterov SGD with cosine decay over `images` (random crop and flip, as the paper's appendix B.5 without its
    LARS; weight decay on weights only); loss_fn(logits, idx, x) -> loss of the batch `idx` and its views x.
    Top-1 on the evaluation images after about ten evenly spaced epochs and the last.
    -> ({epoch: top-1}, logits of the evaluation images)"""
    net = net.to(device, memory_format=torch.channels_last)
    batch = min(args.batch_size, len(images))
    steps = max(1, len(images) // batch)
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([dict(params=decay, weight_decay=args.finetune_weight_decay),
                           dict(params=rest, weight_decay=0.0)], lr=lr * batch / 256, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    size, mean, std = data["size"], data["mean"], data["std"]
    aug = BatchAugment(size, crop_scale=args.finetune_crop_scale, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                       mean=mean.tolist(), std=std.tolist()).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    every, curve = math.ceil(epochs / 10), {}
    for epoch in tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True, disable=None):
        net.train()
        perm = torch.randperm(len(images), generator=gen)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            x = aug(images[idx].to(device), gen).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(net(x), idx, x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            net.eval()
            logits = predict(net, data["eval_images"], size, mean, std, device, dtype)
            curve[epoch + 1] = topk(logits, data["yev"], 1)
    return curve, logits


def finetune(model, images, labels, data, args, device, desc, lr, epochs, head_layers=0):
    """Fine-tune the encoder (and `head_layers` head layers) with a linear classifier on labelled images.
    -> ({epoch: top-1}, logits of the evaluation images, the fine-tuned network)"""
    torch.manual_seed(args.seed)  # the classifier's init
    net = supervised_net(model, head_layers, data["classes"])
    labels = labels.to(device)
    curve, logits = train_net(net, images, lambda out, idx, x: F.cross_entropy(out, labels[idx]), data, args,
                              device, epochs, lr, desc)
    return curve, logits, net


def distill_loss(student_logits, teacher_logits, tau=1.0):
    """SimCLRv2's distillation loss (arXiv 2006.10029, eq. 2): cross-entropy of the student's softmax(./tau) to
    the teacher's softmax(./tau), times tau^2 as in the official code; mean over the batch, in float32."""
    p_teacher = F.softmax(teacher_logits.float() / tau, dim=1)  # (B, classes)
    return -(p_teacher * F.log_softmax(student_logits.float() / tau, dim=1)).sum(1).mean() * tau ** 2


def distill(teacher, student, images, labelled, labels, data, args, device, desc, lr):
    """Train `student` on every image of `images` to match the frozen teacher's softened predictions on the same
    view (no labels), plus with --distill-alpha < 1 the labelled loss of the images in `labelled`, whose labels are
    `labels`: the only labels read. -> ({epoch: top-1}, logits of the evaluation images)"""
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()
    known = torch.full((len(images),), -1, dtype=torch.long)  # -1: unlabelled, ignored by the labelled loss
    known[labelled] = labels
    known, alpha, dtype = known.to(device), args.distill_alpha, amp_dtype(args.amp, device)

    def loss_fn(out, idx, x):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            target = teacher(x)  # (B, classes)
        loss = alpha * distill_loss(out, target, args.distill_tau)
        y = known[idx.to(device)]
        if alpha < 1 and (y >= 0).any():
            loss = loss + (1 - alpha) * F.cross_entropy(out.float(), y, ignore_index=-1)
        return loss
    return train_net(student, images, loss_fn, data, args, device, args.distill_epochs, lr, desc)


@torch.no_grad()
def predict(net, images, size, mean, std, device, dtype, batch_size=512):
    out = []
    for i in range(0, len(images), batch_size):
        x = eval_batch(images[i:i + batch_size].to(device), size, mean, std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out.append(net(x).float().cpu())
    return torch.cat(out)


def topk(logits, y, k):
    k = min(k, logits.shape[1])
    return round((logits.topk(k, dim=1).indices.cpu() == y[:, None]).any(dim=1).float().mean().item() * 100, 2)


# ------------------------------------------------------------------------------------------------- plots

def stage(r, results, init=False):
    """A result's name in tables and plots: 'simclr finetune head 1', with the rate where rates differ."""
    name = f"{r['encoder']} {'init' if init and r['protocol'] == 'finetune' else r['protocol']}"
    name += f" head {r['head_layers']}" if r.get("head_layers") else ""
    rates = {x.get("lr") for x in results if x["protocol"] == r["protocol"]}
    return name + (f" lr {r['lr']:g}" if "lr" in r and len(rates) > 1 else "")


def plot_results(results, out, dataset, split="test"):
    """ablation_DATASET.png: fine-tuning test accuracy per epoch, per encoder and label fraction;
    label_fractions_DATASET.png: accuracy against the label fraction, per encoder and protocol."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    curves = [r for r in results if r.get("curve")]
    if curves:
        fractions = sorted({r["label_fraction"] for r in curves})
        fig, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 3.8), squeeze=False)
        for ax, f in zip(axes[0], fractions):
            for r in (r for r in curves if r["label_fraction"] == f):
                epochs = r.get("curve_epochs") or range(1, len(r["curve"]) + 1)
                ax.plot(epochs, r["curve"], marker="o", label=stage(r, results, init=True))
            ax.set(xlabel="fine-tuning epoch", ylabel=f"{split} top-1 (%)",
                   title=f"{dataset}: fine-tuning on {f:.0%} of the labels")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out, f"ablation_{dataset}{'_val' if split == 'val' else ''}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    fractions = sorted({r["label_fraction"] for r in results})
    if len(fractions) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for key in dict.fromkeys(stage(r, results) for r in results):  # in the order they ran
            rows = sorted((r for r in results if stage(r, results) == key), key=lambda r: r["label_fraction"])
            ax.plot([r["label_fraction"] for r in rows], [r["top1"] for r in rows], marker="o", label=key)
        ax.set(xscale="log", xlabel="fraction of training labels", ylabel=f"{split} top-1 (%)", title=dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, f"label_fractions_{dataset}{'_val' if split == 'val' else ''}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------- main

def main(args):
    t0 = time.time()
    torch.manual_seed(args.seed)
    device = check_device(args.device)
    dtype = amp_dtype(args.amp, device)  # before any work: fp16 on the CPU is refused
    args.finetune_label_fraction = args.finetune_label_fraction or args.label_fraction
    fractions, epochs = args.finetune_label_fraction, args.finetune_epochs
    if len(epochs) not in (1, len(fractions)):
        die(f"--finetune-epochs takes one value or one per fine-tuning label fraction ({len(fractions)}), got "
            f"{len(epochs)}")
    args.finetune_epochs = epochs * len(fractions) if len(epochs) == 1 else epochs
    if not args.ckpt and args.dataset is None:
        die("without --ckpt there is no dataset to take: pass --dataset (e.g. --dataset cifar10)")
    encoders = load_encoders(args)
    out = args.output_dir or (os.path.dirname(os.path.abspath(args.ckpt[0])) if args.ckpt else os.path.join("runs", "eval"))
    make_writable_dir(out, f"the results folder {out}", "pass --output-dir DIR")  # now, not after the evaluation
    first = encoders[0][2]
    data = load_data(args, first, device)
    results = []
    for name, model, a in encoders:
        if model is not None:
            model = model.to(device, memory_format=torch.channels_last)
        if name == "random":
            fit_bn_statistics(model.encoder, data["train_images"], data["size"], data["mean"], data["std"], device, dtype)
        if {"linear", "knn"} & set(args.protocol):
            results += frozen_protocols(name, model, data, args, device, dtype)
        if {"finetune", "distill"} & set(args.protocol) and model is not None:
            results += finetune_protocol(name, model, a, data, args, device, out)

    dataset, split = data["dataset"], args.eval_on
    plots = plot_results(results, out, dataset, split)
    eval_seconds = time.time() - t0
    pretrain_seconds = first.get("train_seconds", 0.0)
    print_table(results, dataset, split)
    head = results[0] if results else {}
    summary = {"top1": head.get("top1"), "top5": head.get("top5"), "ckpt": args.ckpt[0] if args.ckpt else None,
               "dataset": dataset, "eval_on": split, "protocols": args.protocol, "label_fractions": args.label_fraction,
               "train_samples": len(data["ytr"]), "test_samples": len(data["yev"]), "image_size": data["size"]}
    main_f = 1.0 if 1.0 in args.label_fraction else args.label_fraction[0]
    for r in results:  # simclr_top1, random_top1, pixels_top1, ... of the first protocol at all labels
        if r["protocol"] == args.protocol[0] and r["label_fraction"] == main_f and f"{r['encoder']}_top1" not in summary:
            summary[f"{r['encoder']}_top1"] = r["top1"]
    summary.update(results=results, plots=plots, pretrain_seconds=round(pretrain_seconds, 1),
                   eval_seconds=round(eval_seconds, 1), seconds=round(
                       time.time() - args.wall_start if args.wall_start else pretrain_seconds + eval_seconds, 1))
    path = os.path.join(out, f"eval_{dataset}{'_val' if split == 'val' else ''}.json")
    save_json(path, summary)
    print(f"{dataset}: pretraining {pretrain_seconds:.0f} s + evaluation {eval_seconds:.0f} s"
          + (f", {summary['seconds']:.0f} s of wall time in all" if args.wall_start else "")
          + f"; saved {path}" + "".join(f", {p}" for p in plots))
    print(json.dumps(summary))
    return summary


def load_data(args, first, device):
    """The training images and labels, and the images the results are reported on: the test split, or with
    --eval-on val a class-balanced part of the training split held out (then the test split is never read)."""
    dataset = args.dataset or first["dataset"]
    data_dir = args.data_dir or (first.get("data_dir") if dataset == first.get("dataset") else None)
    size = args.image_size or first.get("image_size") or DATASETS[dataset]["size"]
    info = DATASETS[dataset]
    try:
        train_set = get_dataset(dataset, data_dir, "train", download=args.download)
        eval_set = get_dataset(dataset, data_dir, "test", download=args.download) if args.eval_on == "test" else None
    except DatasetError as e:
        die(str(e))
    train_images, ytr = uint8_images(train_set, size)
    if eval_set is None:
        val = balanced_subset(ytr, args.val_fraction, args.val_seed)
        rest = torch.ones(len(ytr), dtype=torch.bool)
        rest[val] = False
        (eval_images, yev), (train_images, ytr) = (train_images[val], ytr[val]), (train_images[rest], ytr[rest])
    else:
        eval_images, yev = uint8_images(eval_set, size)
    pick_tr = random_subset(len(ytr), args.max_train_samples, args.seed)
    pick_ev = random_subset(len(yev), args.max_test_samples, args.seed)
    classes = info["num_classes"] or int(max(ytr.max(), yev.max())) + 1
    fractions = args.label_fraction + args.finetune_label_fraction
    return dict(dataset=dataset, size=size, classes=classes, train_images=train_images[pick_tr], ytr=ytr[pick_tr],
                eval_images=eval_images[pick_ev], yev=yev[pick_ev],
                mean=torch.tensor(info["mean"], device=device), std=torch.tensor(info["std"], device=device),
                subsets={f: balanced_subset(ytr[pick_tr], f, args.seed) for f in fractions})


def frozen_protocols(name, model, data, args, device, dtype):
    """linear and knn on frozen features (None model: the pixels), at every --label-fraction."""
    encoder = None
    if model is not None:
        encoder = model.encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
    t_feat, kw = time.time(), dict(size=data["size"], mean=data["mean"], std=data["std"], device=device, dtype=dtype)
    xtr = extract_features(encoder, data["train_images"], desc=f"{name} train features", **kw)
    xev = extract_features(encoder, data["eval_images"], desc=f"{name} {args.eval_on} features", **kw)
    if encoder is not None:  # the frozen encoder is bit-identical, BN statistics included (moco's check)
        after = encoder.state_dict()
        assert not encoder.training and all(torch.equal(before[k], after[k]) for k in before), "encoder changed"
        for p in encoder.parameters():
            p.requires_grad_(True)
    xtr, xev, ytr, yev = xtr.to(device), xev.to(device), data["ytr"].to(device), data["yev"]
    print(f"{name}: features of {len(xtr)} + {len(xev)} images in {time.time() - t_feat:.0f} s")
    rows = []
    for f in args.label_fraction:
        idx, row = data["subsets"][f], dict(encoder=name, label_fraction=f, split=args.eval_on)
        if "linear" in args.protocol:
            t1 = time.time()
            logits, wd = linear_probe(xtr[idx], ytr[idx], xev, data["classes"], args)  # never sees eval labels
            rows.append(dict(row, protocol="linear", top1=topk(logits, yev, 1), top5=topk(logits, yev, 5),
                             weight_decay=wd, train_samples=len(idx), seconds=round(time.time() - t1, 1)))
        if "knn" in args.protocol:
            t1 = time.time()
            logits = knn_predict(xtr[idx], ytr[idx], xev, data["classes"], args.knn_k, args.knn_t)
            rows.append(dict(row, protocol="knn", top1=topk(logits, yev, 1), top5=topk(logits, yev, 5),
                             train_samples=len(idx), seconds=round(time.time() - t1, 1)))
    return rows


def finetune_protocol(name, model, args_, data, args, device, out):
    """finetune at every --finetune-label-fraction, head depth and rate (the random-init network: its own rates,
    from the encoder); then distill, the teacher being the SimCLR network fine-tuned at the first rate from the
    deepest --finetune-head-layers."""
    rows, scratch = [], name == "random"
    lrs = args.finetune_lr_random if scratch and args.finetune_lr_random else args.finetune_lr
    depths = [0] if scratch else args.finetune_head_layers
    for f, epochs in zip(args.finetune_label_fraction, args.finetune_epochs):
        idx, teacher = data["subsets"][f], None
        for k in depths:
            for lr in lrs:
                t1, tag = time.time(), f"{name}_{f:g}_head{k}_lr{lr:g}"
                curve, logits, net = finetune(model, data["train_images"][idx], data["ytr"][idx], data, args, device,
                                              f"finetune {tag}", lr, epochs, k)
                rows.append(result_row(name, "finetune", f, args, curve, logits, data, t1, lr=lr, head_layers=k,
                                       train_samples=len(idx)))
                save_network(net, out, f"finetuned_{tag}", args_, k, args)
                if k == depths[-1] and lr == lrs[0]:
                    teacher = (net, k, lr, rows[-1]["top1"])
        if "distill" in args.protocol and not scratch:
            net, k, lr, teacher_top1 = teacher
            lr = args.distill_lr or lr
            torch.manual_seed(args.seed)  # the student's classifier (and weights, from random init)
            init = model if args.distill_init == "pretrained" else SimCLR.from_args(args_, zero_init_residual=False)
            student, t1, tag = supervised_net(init, k, data["classes"]), time.time(), f"{name}_{f:g}_head{k}_lr{lr:g}"
            curve, logits = distill(net, student, data["train_images"], idx, data["ytr"][idx], data, args, device,
                                    f"distill {tag}", lr)
            rows.append(result_row(name, "distill", f, args, curve, logits, data, t1, lr=lr, head_layers=k,
                                   teacher_top1=teacher_top1, train_samples=len(data["ytr"]), labelled=len(idx),
                                   init=args.distill_init, tau=args.distill_tau, alpha=args.distill_alpha))
            save_network(student, out, f"distilled_{tag}", args_, k, args)
    return rows


def result_row(name, protocol, f, args, curve, logits, data, t1, **extra):
    return dict(encoder=name, protocol=protocol, label_fraction=f, split=args.eval_on, **extra,
                top1=curve[max(curve)], top5=topk(logits, data["yev"], 5), curve=list(curve.values()),
                curve_epochs=list(curve), seconds=round(time.time() - t1, 1))


def save_network(net, out, stem, train_args, head_layers, args):
    """With --save-finetuned: OUT/STEM.pt, the classifier network (encoder, head layers, linear classifier)."""
    if args.save_finetuned:
        state = {k: v.cpu() for k, v in net.state_dict().items()}
        save_checkpoint(os.path.join(out, stem + ".pt"), {"model": state, "head_layers": head_layers,
                                                          "args": train_args})


def print_table(results, dataset, split="test"):
    if not results:
        return
    rows = [(r["encoder"], r["protocol"] + (f" head {r['head_layers']}" if r.get("head_layers") else "")
             + (f" lr {r['lr']:g}" if "lr" in r else ""), f"{r['label_fraction']:g}",
             f"{r['top1']:.2f}", f"{r['top5']:.2f}") for r in results]
    head = ("encoder", "protocol", "labels", "top-1 %", "top-5 %")
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(5)]
    line = lambda x: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(x, widths)))  # noqa
    print(f"\n{dataset} {'test set' if split == 'test' else 'validation images (held out of the training split)'}")
    print(line(head))
    for r in rows:
        print(line(r))
    print()


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
