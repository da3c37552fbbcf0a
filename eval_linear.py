"""Linear evaluation of SimCLR encoders (arXiv 2002.05709, section 4.2): frozen features, an
L2-regularised logistic regression whose weight decay is chosen on held-out training images, and
kNN; beside the same network with random weights and the raw pixels."""
import argparse
import time

import torch
import torch.nn.functional as F

import evaluation as ev
from harness import (Parser, amp_dtype, at_least, check_device, die, make_writable_dir,
                     positive_float, positive_int)

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
                        "(cosine, temperature-weighted votes) (default: %(default)s)")
    g.add_argument("--weight-decay", nargs="+", type=at_least(0, float), default=WEIGHT_DECAYS,
                   help="linear: L2 penalties to choose from on 10%% of the training images held "
                        "out; one value skips the choice (default: 1e-6 ... 1e-2)")
    g.add_argument("--knn-k", type=positive_int, default=200, help="(default: %(default)s)")
    g.add_argument("--knn-t", type=positive_float, default=0.07,
                   help="vote temperature (default: %(default)s)")
    return p


def main(args):
    t0 = time.time()
    torch.manual_seed(args.seed)
    device = check_device(args.device)
    dtype = amp_dtype(args.amp, device)  # before any work: fp16 on the CPU is refused
    if not args.ckpt and args.dataset is None:
        die("without --ckpt there is no dataset to take: pass --dataset (e.g. --dataset cifar10)")
    encoders = ev.load_encoders(args, pixels=args.pixels)
    out = ev.output_dir(args)
    # now, not after the work
    make_writable_dir(out, f"the results folder {out}", "pass --output-dir DIR")
    first = encoders[0].train_args
    data = ev.load_data(args, first, device)
    rows = []
    for enc in encoders:
        model = enc.model
        chosen = {}
        if enc.name == "random":
            model, chosen = strongest_random(enc.train_args, data, args, device, dtype)
        elif model is not None:
            model = model.to(device, memory_format=torch.channels_last)
        for row in frozen_protocols(enc.name, model, data, args, device, dtype):
            rows.append(dict(row, **chosen))
    return ev.finish(out, data, args, rows, "eval_linear", t0, first)


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
            ev.fit_bn_statistics(encoder, data.train_images[fit], data.view, device, dtype)
        encoder.eval()
        x_fit = ev.features(encoder, data.train_images[fit], data.view, device, dtype).to(device)
        x_held = ev.features(encoder, data.train_images[held], data.view, device, dtype).to(device)
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
        ev.fit_bn_statistics(model.encoder, data.train_images, data.view, device, dtype)
    return model, {"variant": variant, "variant_scores": scores}


def frozen_protocols(name, model, data, args, device, dtype):
    """linear and knn on frozen features (model None: the pixels), at every --label-fraction."""
    encoder = None
    if model is not None:
        encoder = model.encoder.eval()
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
    t_features = time.time()
    train = ev.features(encoder, data.train_images, data.view, device, dtype, f"{name} train")
    held = ev.features(encoder, data.eval_images, data.view, device, dtype, f"{name} {data.split}")
    # the frozen encoder is bit-identical, BN statistics included (moco's check)
    if encoder is not None:
        after = encoder.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert not encoder.training and unchanged, "encoder changed"
    train = train.to(device)
    held = held.to(device)
    labels = data.train_labels.to(device)
    seconds = time.time() - t_features
    print(f"{name}: features of {len(train)} + {len(held)} images in {seconds:.0f} s")
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


# ------------------------------------------------------------------------------------------ the
# linear probe
def linear_probe(xtr, ytr, xte, classes, weight_decays, seed=0):
    """Standardise with the training statistics, choose the weight decay on 10% of the training
    images held out, refit on all of them, score `xte`. -> (logits of xte, the chosen weight decay)
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
    """Multinomial logistic regression by full-batch L-BFGS: mean cross-entropy + weight_decay / 2
    ||W||^2. -> nn.Linear, started from zeros or from `init`'s weights"""
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
