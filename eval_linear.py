"""Linear evaluation of a SimCLR encoder (arXiv 2002.05709, section 4): the encoder is frozen in eval mode,
its features of the train and test splits are extracted once, and a linear classifier is trained on them.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import eval_transform
from data import DATASETS, DatasetError, get_dataset, labels
from model import ARCHS, SimCLR
from train import Parser, die, load_checkpoint, load_model_state


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR linear evaluation", add_help=False)
    g = p.add_argument_group("encoder")
    g.add_argument("--ckpt", default=None, help="a train.py checkpoint (last.pt)")
    g.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised encoder (the baseline)")
    g.add_argument("--arch", default="resnet18", choices=ARCHS, help="with --random-init (default: %(default)s)")
    g.add_argument("--width", type=float, default=1.0, help="with --random-init (default: %(default)s)")
    g.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="with --random-init (default: on for images of 64 px or less)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="(default: the checkpoint's; STL-10 trains on its 5k labelled images, tests on 8k)")
    g.add_argument("--data-dir", default=None, help="dataset root (default: the checkpoint's)")
    g.add_argument("--image-size", type=int, default=None, help="(default: the checkpoint's, else the dataset's)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--max-train-samples", type=int, default=None, help="use the first N training images (quick checks)")
    g.add_argument("--max-test-samples", type=int, default=None, help="use the first N test images (quick checks)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="(default: %(default)s)")
    g = p.add_argument_group("linear classifier")
    g.add_argument("--epochs", type=int, default=100, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, cosine decay (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="(default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--output-dir", default=None,
                   help="where the results JSON goes (default: beside the checkpoint; runs/eval with --random-init)")
    return p


@torch.no_grad()
def extract_features(encoder, dataset, device, batch_size=512, workers=0, desc="features"):
    """(features (N, d) float32 on CPU, labels (N,)) of the frozen encoder, no augmentation."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    feats, ys = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        feats.append(encoder(x.to(device, non_blocking=True)).float().cpu())  # (B, d)
        ys.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(ys)


def train_linear(x, y, num_classes, epochs, lr, weight_decay, batch_size, device, seed=0):
    """Multinomial logistic regression on standardised features; SGD with momentum and cosine decay."""
    gen = torch.Generator().manual_seed(seed)
    clf = torch.nn.Linear(x.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = epochs * max(1, x.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x, y = x.to(device), y.to(device)
    for _ in tqdm(range(epochs), desc="linear", leave=False, dynamic_ncols=True, disable=None):
        perm = torch.randperm(x.shape[0], generator=gen).to(device)
        for i in range(max(1, x.shape[0] // batch_size)):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


def topk(logits, y, k):
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).float().mean().item() * 100


def build_encoder(args):
    """-> (encoder, its train args as a dict, name)"""
    if args.random_init:
        size = args.image_size or DATASETS[args.dataset or "stl10"]["size"]
        cifar_stem = size <= 64 if args.cifar_stem is None else args.cifar_stem
        model = SimCLR(args.arch, cifar_stem=cifar_stem, width=args.width)
        torch.manual_seed(args.seed)
        return model, dict(arch=args.arch, width=args.width, cifar_stem=cifar_stem, image_size=size), "random-init"
    if not args.ckpt:
        die("pass --ckpt PATH (a last.pt of train.py) or --random-init --arch NAME")
    ckpt = load_checkpoint(args.ckpt)
    a = dict(ckpt["args"], train_seconds=ckpt.get("train_seconds", 0.0))
    model = SimCLR(a["arch"], a["proj_dim"], a["cifar_stem"], a["width"], stem_stride=a.get("stem_stride", 1))
    load_model_state(model, ckpt, args.ckpt)
    return model, a, args.ckpt


def main(args):
    t0 = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        die("--epochs, --batch-size and --lr must be positive")
    model, train_args, name = build_encoder(args)
    dataset = args.dataset or train_args.get("dataset") or "stl10"
    data_dir = args.data_dir or (train_args.get("data_dir") if dataset == train_args.get("dataset") else None)
    size = args.image_size or train_args.get("image_size") or DATASETS[dataset]["size"]
    info = DATASETS[dataset]
    tf = eval_transform(size, info["mean"], info["std"])
    try:
        train_set = get_dataset(dataset, data_dir, "train", tf, download=args.download)
        test_set = get_dataset(dataset, data_dir, "test", tf, download=args.download)
    except DatasetError as e:
        die(str(e))
    if args.max_train_samples:
        train_set = torch.utils.data.Subset(train_set, range(min(args.max_train_samples, len(train_set))))
    if args.max_test_samples:
        test_set = torch.utils.data.Subset(test_set, range(min(args.max_test_samples, len(test_set))))

    encoder = model.encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    xtr, ytr = extract_features(encoder, train_set, device, workers=args.workers, desc="train features")
    xte, yte = extract_features(encoder, test_set, device, workers=args.workers, desc="test features")
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6  # standardise with the training statistics
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    num_classes = info["num_classes"] or int(max(ytr.max(), yte.max())) + 1
    clf = train_linear(xtr, ytr, num_classes, args.epochs, args.lr, args.weight_decay, args.batch_size, device,
                       args.seed)
    with torch.no_grad():
        logits = clf(xte.to(device)).cpu()  # (N_test, classes)
    # the frozen encoder must come out bit-identical, BN statistics included (as moco's lincls checks)
    after = encoder.state_dict()
    assert not encoder.training and all(torch.equal(before[k], after[k]) for k in before), "encoder changed"

    result = {"top1": round(topk(logits, yte, 1), 2), "top5": round(topk(logits, yte, 5), 2), "ckpt": name,
              "dataset": dataset, "protocol": "linear", "arch": train_args["arch"], "width": train_args["width"],
              "image_size": size, "train_samples": len(xtr), "test_samples": len(xte), "epochs": args.epochs,
              "seconds": round(time.time() - t0, 1), "pretrain_seconds": round(train_args.get("train_seconds", 0.0), 1)}
    out = args.output_dir or (os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt and not args.random_init
                              else os.path.join("runs", "eval"))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"linear_{dataset}{'_random-init' if args.random_init else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"linear probe on {dataset}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% (pretraining "
          f"{result['pretrain_seconds']:.0f} s + evaluation {result['seconds']:.0f} s); saved {path}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
