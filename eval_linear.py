"""Linear evaluation of SimCLR encoders (arXiv 2002.05709, section 4.2): frozen features, an
L2-regularised logistic regression whose weight decay is chosen on held-out training images, and
kNN; beside the same network with random weights and the raw pixels."""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import evaluation as ev
from augment import ImageSpec, enlarge
from data import DATASETS, DatasetError, get_dataset, uint8_images
from harness import (Parser, amp_dtype, at_least, atomic_write, check_device, die, figure,
                     make_writable_dir, positive_float, positive_int, save_figure)

WEIGHT_DECAYS = [10.0 ** e for e in range(-6, -1)]  # grid for the logistic regression, per sample
PATH_ITERS = 50  # L-BFGS iterations per weight decay while choosing it (a warm-started path)
# The random-init baseline takes each of these forms; the one whose linear probe scores best on
# held-out training images is reported: SimCLR is measured against the strongest random features.
# name: (zero-init residual branches, BN statistics fitted on the training images)
RANDOM_VARIANTS = {
    "all branches, fitted BN": (False, True),
    "all branches, fresh BN": (False, False),
    "zero-init branches, fitted BN": (True, True),
    "zero-init branches, fresh BN": (True, False),
}
SELECTION_IMAGES = 10000  # training images that choose the variant: 80% fit its probe, 20% score it


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR linear evaluation", add_help=False)
    ev.add_common_flags(p)
    g = p.add_argument_group("frozen-feature protocols")
    g.add_argument("--pixels", action="store_true", help="also the raw pixels as features")
    g.add_argument("--protocol", nargs="+", default=["linear"], choices=("linear", "knn"),
                   help="linear: logistic regression on frozen features; knn: k nearest neighbours "
                        "(cosine, temperature-weighted votes)")
    g.add_argument("--head-layers", nargs="+", type=at_least(0), default=[0],
                   help="the checkpoints' features after K layers of the projection head: 0 is the "
                        "encoder's h (the paper's choice), the head's depth its output z; several "
                        "values are each evaluated")
    g.add_argument("--weight-decay", nargs="+", type=at_least(0, float), default=WEIGHT_DECAYS,
                   help="linear: L2 penalties to choose from on 10%% of the training images held "
                        "out; one value skips the choice (default: 1e-6 ... 1e-2)")
    g.add_argument("--knn-k", type=positive_int, default=200)
    g.add_argument("--knn-t", type=positive_float, default=0.07,
                   help="vote temperature")
    g.add_argument("--save-features", metavar="DIR",
                   help="also write each encoder's frozen features h (or after --head-layers K) "
                        "to DIR/ENCODER[_headK]_SPLIT.npz, one file per split (train, and test or "
                        "val), in the order of the dataset: features (N, d), labels (-1: none), "
                        "index (the image's index in its split); a folder without class "
                        "sub-folders: the features of every image in it (SPLIT unlabeled, and its "
                        "paths), nothing evaluated")
    g.add_argument("--neighbours", type=at_least(0), default=8,
                   help="queries of neighbours_DATASET.png, each with its 8 nearest training "
                        "images by every encoder's features; 0: no picture")
    return p


def main(args):
    t0 = time.time()
    torch.manual_seed(args.seed)
    device = check_device(args.device)
    dtype = amp_dtype(args.amp, device)  # before any work: fp16 on the CPU is refused
    if not args.ckpt and args.dataset is None:
        die("without --ckpt there is no dataset to take: pass --dataset (e.g. --dataset cifar10)")
    encoders = ev.load_encoders(args, pixels=args.pixels)
    for enc in encoders:
        layers = enc.model.projector.layers if enc.model is not None else 0
        if enc.name not in ("random", "pixels") and max(args.head_layers) > layers:
            die(f"--head-layers {max(args.head_layers)}: the projection head of {enc.path} has "
                f"{layers} layers: use 0 (h) to {layers} (z)")
    out = ev.output_dir(args)
    # check that the results folders are writable now, not after the work
    make_writable_dir(out, f"the results folder {out}", "pass --output-dir DIR")
    if args.save_features:
        make_writable_dir(args.save_features, f"--save-features {args.save_features}",
                          "pass a folder you can write to")
    first = encoders[0].train_args
    if args.save_features and unlabelled_folder(args, first):
        return folder_features(args, encoders, first, device, dtype)
    data = ev.load_data(args, first, device)
    rows = []
    # encoder name -> (train features, evaluation features) for the neighbours picture
    pictured = {}
    for enc in encoders:
        extra = {}
        depths = args.head_layers
        if enc.name == "random":  # the random networks are judged by their h only
            model, extra = strongest_random(enc.train_args, data, args, device, dtype)
            depths = [0]
        elif enc.model is not None:
            model = enc.model.to(device, memory_format=torch.channels_last)
        else:
            model, depths = None, [0]
        for k in depths:
            net = None if model is None else frozen_net(model, k)
            train, held = frozen_features(enc.name, net, data, device, dtype)
            if args.save_features:
                tag = enc.name + (f"_head{k}" if k else "")
                write_features(args.save_features, f"{tag}_train", train, data.train_labels,
                               data.train_index)
                write_features(args.save_features, f"{tag}_{data.split}", held, data.eval_labels,
                               data.eval_index)
            if enc.name not in pictured:
                pictured[enc.name] = (train, held)
            if k:
                extra = dict(extra, head_layers=k)
            for row in frozen_protocols(enc.name, train, held, data, args, device):
                rows.append(dict(row, **extra))
    t1 = time.time()
    picture = neighbours_picture(pictured, data, out, args.neighbours, args.seed)
    if picture:
        print(f"neighbours picture in {time.time() - t1:.1f} s")
    return ev.report(out, data, args, rows, "eval_linear", t0, first, plots=[picture])


# ---------------------------------------------------------------------------------- saved features
def write_features(folder, stem, features, labels, index, **more):
    """FOLDER/STEM.npz: features (N, d) float32, labels (N,) int64, index (N,) int64, and `more`."""
    path = os.path.join(folder, stem + ".npz")
    arrays = dict(features=features.float().cpu().numpy(), labels=labels.long().numpy(),
                  index=index.long().numpy(), **more)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    print(f"wrote {path}: {arrays['features'].shape[0]} x {arrays['features'].shape[1]} features")
    return path


def unlabelled_folder(args, train_args):
    """Whether --dataset folder's images have no train/test (or val) class sub-folders."""
    dataset = args.dataset or train_args["dataset"]
    root = args.data_dir
    if root is None and dataset == train_args["dataset"]:
        root = train_args.get("data_dir")
    if dataset != "folder" or not root:
        return False
    return not any(os.path.isdir(os.path.join(root, s)) for s in ("train", "test", "val"))


def folder_features(args, encoders, train_args, device, dtype):
    """--save-features on a folder without labels: every image's features, per encoder, into
    DIR/ENCODER_unlabeled.npz with the images' paths; no protocol runs (none has labels)."""
    if args.random_init:
        die("--random-init picks its random network with labels: for a folder without class "
            "sub-folders pass --ckpt (and --pixels) only")
    root = args.data_dir or train_args.get("data_dir")
    size = args.image_size or train_args.get("image_size") or DATASETS["folder"]["size"]
    try:
        folder = get_dataset("folder", root, "unlabeled")
    except DatasetError as e:
        die(str(e))
    images, labels = uint8_images(folder, size)
    spec = ImageSpec(size, DATASETS["folder"]["mean"], DATASETS["folder"]["std"])
    written = []
    for enc in encoders:
        net = None
        if enc.model is not None:
            net = enc.model.encoder.to(device, memory_format=torch.channels_last).eval()
        features = ev.features(net, images, spec, device, dtype, f"{enc.name} unlabeled")
        written.append(write_features(args.save_features, f"{enc.name}_unlabeled", features,
                                      labels, torch.arange(len(labels)),
                                      paths=np.array(folder.files)))
    return written


def frozen_net(model, k):
    """The network whose outputs are judged: the encoder (k = 0, the features h), then the head's
    first k layers, or the whole head (k = its depth: the projection z the loss sees)."""
    if k == 0:
        return model.encoder
    if k == model.projector.layers:
        return nn.Sequential(model.encoder, model.projector)
    return nn.Sequential(model.encoder, model.projector.first_layers(k))


def strongest_random(train_args, data, args, device, dtype):
    """The random-init baseline: of RANDOM_VARIANTS, the network whose linear probe scores best on
    training images held out of its fit (the evaluation images are never read for it).
    -> (the network, {"variant": its name, "variant_scores": {name: held-out top-1}})"""
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(data.train_labels), generator=gen)[:SELECTION_IMAGES]
    n_fit = len(pick) * 4 // 5
    fit, held = pick[:n_fit], pick[n_fit:]
    labels = data.train_labels.to(device)
    scores = {}
    for variant, (zero_init, fitted) in RANDOM_VARIANTS.items():
        model = ev.random_network(train_args, args.seed, zero_init)
        encoder = model.encoder.to(device, memory_format=torch.channels_last)
        if fitted:
            ev.fit_bn_statistics(encoder, data.train_images[fit], data.spec, device, dtype)
        encoder.eval()
        x_fit = ev.features(encoder, data.train_images[fit], data.spec, device, dtype).to(device)
        x_held = ev.features(encoder, data.train_images[held], data.spec, device, dtype).to(device)
        logits, _ = linear_probe(x_fit, labels[fit], x_held, data.classes, args.weight_decay,
                                 args.seed)
        scores[variant] = ev.topk(logits, data.train_labels[held], 1)
    variant = max(scores, key=scores.get)  # a tie goes to the first listed
    print("random init, held-out top-1: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
          + f"; reported: {variant}")
    zero_init, fitted = RANDOM_VARIANTS[variant]
    model = ev.random_network(train_args, args.seed, zero_init)
    model = model.to(device, memory_format=torch.channels_last)
    if fitted:  # its BN normalises with the statistics of all the training images
        ev.fit_bn_statistics(model.encoder, data.train_images, data.spec, device, dtype)
    return model, {"variant": variant, "variant_scores": scores}


def frozen_features(name, net, data, device, dtype):
    """(training, evaluation) features of a frozen network in eval mode (None: the pixels), on
    `device`; the network is checked bit-identical afterwards, BN statistics included, as moco's
    lincls checks."""
    t0 = time.time()
    before = None
    if net is not None:
        net.eval()
        before = {k: v.clone() for k, v in net.state_dict().items()}
    train = ev.features(net, data.train_images, data.spec, device, dtype, f"{name} train")
    held = ev.features(net, data.eval_images, data.spec, device, dtype, f"{name} {data.split}")
    if net is not None:
        after = net.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert not net.training and unchanged, "encoder changed"
    print(f"{name}: features of {len(train)} + {len(held)} images in {time.time() - t0:.0f} s")
    return train.to(device), held.to(device)


def frozen_protocols(name, train, held, data, args, device):
    """linear and knn on frozen features (training, evaluation), at every --label-fraction."""
    labels = data.train_labels.to(device)
    rows = []
    for fraction in args.label_fraction:
        idx = ev.balanced_subset(data.train_labels, fraction, args.seed)
        row = dict(encoder=name, label_fraction=fraction, split=data.split, train_samples=len(idx))
        if "linear" in args.protocol:
            t1 = time.time()
            # the evaluation labels are not even an argument
            logits, wd = linear_probe(train[idx], labels[idx], held, data.classes,
                                      args.weight_decay, args.seed)
            rows.append(dict(row, protocol="linear", top1=ev.topk(logits, data.eval_labels, 1),
                             top5=ev.topk(logits, data.eval_labels, 5), weight_decay=wd,
                             seconds=round(time.time() - t1, 1)))
        if "knn" in args.protocol:
            t1 = time.time()
            scores = ev.knn_predict(train[idx], labels[idx], held, data.classes, args.knn_k,
                                    args.knn_t)
            rows.append(dict(row, protocol="knn", top1=ev.topk(scores, data.eval_labels, 1),
                             top5=ev.topk(scores, data.eval_labels, 5),
                             seconds=round(time.time() - t1, 1)))
    return rows


# ------------------------------------------------------------------------------- nearest neighbours
def neighbours_picture(features, data, out, queries, seed, k=8):
    """neighbours_DATASET.png: `queries` evaluation images (one per class, the classes drawn with
    `seed`) and, in a panel per encoder, the k training images nearest to each by cosine similarity
    of that encoder's features; a green frame where a neighbour shares the query's class, red where
    not. -> its path, or None for 0 queries."""
    if not queries or not features:
        return None
    gen = torch.Generator().manual_seed(seed)
    classes = data.eval_labels.unique()
    picked_classes = classes[torch.randperm(len(classes), generator=gen)[:queries]].sort().values
    picks = []
    for c in picked_classes.tolist():
        members = (data.eval_labels == c).nonzero()[:, 0]
        picks.append(members[torch.randint(len(members), (1,), generator=gen)].item())
    panels = []
    for name, (train, held) in features.items():
        tiles = []
        same = 0
        for q, row in zip(picks, nearest(train, held[picks], k)):
            query_class = data.eval_labels[q].item()
            tiles.append(framed(data.eval_images[q], (0.2, 0.2, 0.2)))
            for i in row.tolist():
                match = data.train_labels[i].item() == query_class
                same += match
                colour = (0.1, 0.7, 0.1) if match else (0.9, 0.1, 0.1)
                tiles.append(framed(data.train_images[i], colour))
        grid = torchvision.utils.make_grid(torch.stack(tiles), nrow=k + 1, padding=2, pad_value=1.0)
        split = "test" if data.split == "test" else "validation"
        title = (f"{name}: {split} query, then its {k} nearest training images\n"
                 f"{same} of {len(picks) * k} of the query's class (green)")
        panels.append((title, grid))
    height, width = panels[0][1].shape[1:]
    fig, axes = figure(len(panels), width=width / 100 + 0.2, height=height / 100 + 1.0)
    for ax, (title, grid) in zip(axes, panels):
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    return save_figure(fig, os.path.join(out, f"neighbours_{data.dataset}{data.suffix}.png"))


def nearest(train, queries, k):
    """Indices (Q, k) of the k training features most similar to each query (cosine similarity)."""
    sim = F.normalize(queries, dim=1) @ F.normalize(train, dim=1).T  # (Q, N_train)
    return sim.topk(k, dim=1).indices.cpu()


def framed(image, colour, min_side=84):
    """uint8 (C, S, S) -> float (3, kS + 6, kS + 6) in [0, 1]: enlarged by a whole factor to at
    least min_side px (a 28 px image at 84), in a 3 px frame of `colour`."""
    x = enlarge(image[None].float() / 255, min_side)[0].expand(3, -1, -1)  # (3, kS, kS)
    frame = torch.tensor(colour).view(3, 1, 1).expand(3, x.shape[1] + 6, x.shape[2] + 6).clone()
    frame[:, 3:-3, 3:-3] = x
    return frame


# --------------------------------------------------------------------------------- the linear probe
def linear_probe(xtr, ytr, xte, classes, weight_decays, seed=0):
    """Standardise with the training statistics, choose the weight decay on 10% of the training
    images held out, refit on all of them, score `xte`. -> (logits of xte, the chosen weight decay).
    The choice walks the regularisation path from the strongest decay down, each fit warm-started
    from the previous one (as glmnet does), so PATH_ITERS L-BFGS iterations per decay are enough to
    rank them; the refit runs the full 200."""
    mean = xtr.mean(0)
    std = xtr.std(0) + 1e-6
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    decays = sorted(weight_decays, reverse=True)
    best = decays[0]
    init = None
    if len(decays) > 1:
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, len(ytr) // 10)
        val, fit = perm[:n_val], perm[n_val:]
        scores, fits = [], []
        for wd in decays:  # strongest first, each fit warm-started from the previous one
            init = fit_logistic(xtr[fit], ytr[fit], classes, wd, init=init, max_iter=PATH_ITERS)
            fits.append(init)
            with torch.no_grad():
                scores.append((init(xtr[val]).argmax(1) == ytr[val]).float().mean().item())
        # the best held-out score; a tie goes to the strongest decay, the simplest model
        i = max(range(len(decays)), key=lambda i: (scores[i], -i))
        best, init = decays[i], fits[i]
    clf = fit_logistic(xtr, ytr, classes, best, init=init)  # all the training images, warm-started
    with torch.no_grad():
        return clf(xte), best


def fit_logistic(x, y, classes, weight_decay, init=None, max_iter=200):
    """Multinomial logistic regression by full-batch L-BFGS: mean cross-entropy +
    weight_decay / 2 ||W||^2. -> nn.Linear, started from zeros or from `init`'s weights"""
    clf = torch.nn.Linear(x.shape[1], classes).to(x.device)
    if init is not None:
        clf.load_state_dict(init.state_dict())
    else:
        torch.nn.init.zeros_(clf.weight)
        torch.nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + weight_decay / 2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return clf


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
