"""What SimCLR's evaluations share (arXiv 2002.05709, section 4, appendix B): encoders from
checkpoints, labelled images with a validation split held out of training, frozen forward passes,
kNN, the results file, table and plots, and train.py's monitors with labels (online probe, kNN)."""
import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from augment import ImageSpec
from data import DATASETS, DatasetError, get_dataset, uint8_images
from harness import (add_device_flags, atomic_write, autocast, checked, die, figure,
                     load_checkpoint, load_model_state, positive_int, save_figure)
from model import SimCLR

# what a checkpoint's weights depend on: the flags that rebuild its network
MODEL_ARGS = ("arch", "width", "cifar_stem", "stem_stride", "proj_dim", "proj_layers")
label_fraction = checked(float, lambda f: 0 < f <= 1, "takes label fractions in (0, 1]")
SCRIPTS = ("eval_linear", "finetune")  # the scripts whose rows share a results file, in this order


def add_common_flags(p):
    """The flags of both evaluation scripts: which encoders, which images, where the results go."""
    g = p.add_argument_group("encoders")
    g.add_argument("--ckpt", nargs="*", default=[],
                   help="train.py checkpoints (last.pt), one or several")
    g.add_argument("--random-init", action="store_true",
                   help="also the first checkpoint's network with random weights: the ablation's "
                        "baseline")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="(default: the checkpoint's; STL-10 trains on its 5k labelled images, "
                        "tests on its 8k)")
    g.add_argument("--data-dir", default=None, help="dataset root (default: the checkpoint's)")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="(default: the checkpoint's, else the dataset's)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="let torchvision download a missing dataset")
    g.add_argument("--max-train-samples", type=positive_int, default=None,
                   help="N training images drawn at random with --seed, for quick checks (default: "
                        "all)")
    g.add_argument("--max-test-samples", type=positive_int, default=None,
                   help="N test (or validation) images drawn at random with --seed, for quick "
                        "checks (default: all)")
    g.add_argument("--eval-on", default="test", choices=("test", "val"),
                   help="val: hold out --val-fraction of the training split (class-balanced, fixed "
                        "by --val-seed), train on the rest and report on it; the test split is "
                        "never read. Choose every hyperparameter on val, then read test once per "
                        "reported run")
    g.add_argument("--val-fraction",
                   type=checked(float, lambda f: 0 < f < 1, "takes a fraction in (0, 1)"),
                   default=0.1)
    g.add_argument("--val-seed", type=int, default=0,
                   help="draws the validation images; fixed, so that every run and seed sees the "
                        "same")
    g.add_argument("--label-fraction", nargs="+", type=label_fraction, default=[1.0],
                   help="class-balanced fractions of the training labels, e.g. 0.01 0.1 1.0 ")

    g = p.add_argument_group("run")
    add_device_flags(g)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-dir", default=None,
                   help="where results and plots go (default: beside the first checkpoint, else "
                        "runs/eval)")
    return p


# ----------------------------------------------------------------------------------------- encoders
@dataclass
class Encoder:
    name: str  # "simclr" (or the checkpoint's folder when there are several), "random", "pixels"
    model: SimCLR  # None for the pixels
    train_args: dict  # the checkpoint's train.py args, with its train_seconds
    path: str = None  # the checkpoint (random init: the one whose network it takes)


def load_encoders(args, pixels=False):
    """Every --ckpt, then with --random-init the first one's network with random weights as its
    pretraining started (eval_linear.py chooses among other random networks too), then with `pixels`
    the raw pixels (model None)."""
    encoders = []
    for i, path in enumerate(args.ckpt):
        ckpt = load_checkpoint(path)
        train_args = dict(ckpt["args"], train_seconds=ckpt.get("train_seconds", 0.0))
        model = SimCLR.from_args(train_args)
        load_model_state(model, ckpt, path, MODEL_ARGS)
        name = "simclr"
        if len(args.ckpt) > 1:
            name = os.path.basename(os.path.dirname(os.path.abspath(path))) or str(i)
        encoders.append(Encoder(name, model, train_args, path))
    if args.random_init:
        if not encoders:
            die("--random-init takes the architecture of a checkpoint: pass --ckpt PATH too")
        first = encoders[0].train_args
        model = random_network(first, args.seed)
        encoders.append(Encoder("random", model, dict(first, train_seconds=0.0), args.ckpt[0]))
    if pixels:
        first = encoders[0].train_args if encoders else {}
        encoders.append(Encoder("pixels", None, dict(first, arch="pixels", train_seconds=0.0)))
    if not encoders:
        die("nothing to evaluate: pass --ckpt PATH (a last.pt of train.py), with --random-init or "
            "--pixels")
    return encoders


def random_network(train_args, seed, zero_init_residual=True):
    """The checkpoint's network with random weights. zero_init_residual: each block's last BN
    starts at zero, as pretraining starts (init_zero); False: every residual branch contributes."""
    torch.manual_seed(seed)
    return SimCLR.from_args(train_args, zero_init_residual=zero_init_residual)


# --------------------------------------------------------------------------------------------- data
@dataclass
class Labelled:
    """The labelled images of an evaluation: uint8 (N, C, H, W) and labels (N,) to train on, and
    those the results are reported on (the test split, or the validation images held out of the
    training split)."""
    dataset: str
    split: str  # "test" or "val"
    spec: ImageSpec  # the side and normalisation the networks take
    classes: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    train_index: torch.Tensor = None  # each image's index in the split it comes from (train)
    eval_index: torch.Tensor = None  # (test; or train, for the validation images)

    @property
    def suffix(self):
        """Of the files written for these results: "" on test, "_val" on validation."""
        return "_val" if self.split == "val" else ""


def load_data(args, train_args, device):
    """The training images and the images results are reported on: the test split, or with
    --eval-on val a class-balanced part of the training split held out (the test split unopened)."""
    dataset = args.dataset or train_args["dataset"]
    data_dir = args.data_dir
    if data_dir is None and dataset == train_args.get("dataset"):
        data_dir = train_args.get("data_dir")
    size = args.image_size or train_args.get("image_size") or DATASETS[dataset]["size"]
    info = DATASETS[dataset]
    try:
        train_set = get_dataset(dataset, data_dir, "train", download=args.download)
        test_set = None
        if args.eval_on == "test":
            test_set = get_dataset(dataset, data_dir, "test", download=args.download)
    except DatasetError as e:
        die(str(e))
    train_images, train_labels = uint8_images(train_set, size)
    train_index = torch.arange(len(train_labels))
    if test_set is None:
        val = balanced_subset(train_labels, args.val_fraction, args.val_seed)
        rest = torch.ones(len(train_labels), dtype=torch.bool)
        rest[val] = False
        eval_images, eval_labels, eval_index = train_images[val], train_labels[val], val
        train_images, train_labels = train_images[rest], train_labels[rest]
        train_index = train_index[rest]
    else:
        eval_images, eval_labels = uint8_images(test_set, size)
        eval_index = torch.arange(len(eval_labels))
    pick_train = random_subset(len(train_labels), args.max_train_samples, args.seed)
    pick_eval = random_subset(len(eval_labels), args.max_test_samples, args.seed)
    classes = info["num_classes"] or int(max(train_labels.max(), eval_labels.max())) + 1
    return Labelled(dataset, args.eval_on, ImageSpec(size, info["mean"], info["std"]), classes,
                    train_images[pick_train], train_labels[pick_train],
                    eval_images[pick_eval], eval_labels[pick_eval],
                    train_index[pick_train], eval_index[pick_eval])


def random_subset(n, k, seed):
    """Indices of k of n items drawn with the seed, in their order (all of them when k is None or
    k >= n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def balanced_subset(labels, fraction, seed):
    """Indices of a class-balanced subset: round(fraction * n_c) (at least 1) images of each
    class c."""
    if fraction >= 1:
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero()[:, 0]
        k = max(1, round(fraction * len(idx)))
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picks).sort().values


# ----------------------------------------------------------------------------------- forward passes
@torch.no_grad()
def forward_batches(net, images, spec, device, dtype=None, batch_size=512, desc=None):
    """net's float32 outputs on the host for each batch of uint8 `images` in their evaluation form
    (no augmentation), under autocast to `dtype` (None: float32)."""
    batches = range(0, len(images), batch_size)
    show = None if desc else True  # tqdm: None shows the bar on a terminal only, True hides it
    for i in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=show):
        x = spec.batch(images[i:i + batch_size].to(device))  # (B, 3, S, S)
        with autocast(device, dtype):
            yield net(x.contiguous(memory_format=torch.channels_last)).float().cpu()


class Pixels(torch.nn.Module):
    """The normalised pixels as features, in the image's own channels:
    (B, 3, S, S) -> (B, C S^2)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x[:, :self.channels].flatten(1)


def features(encoder, images, spec, device, dtype=None, desc="features"):
    """(N, d) float32 features of a frozen `encoder` (None: the pixels) on uint8 images."""
    net = Pixels(images.shape[1]) if encoder is None else encoder
    return torch.cat(list(forward_batches(net, images, spec, device, dtype, desc=desc)))


def predict(net, images, spec, device, dtype=None):
    """(N, classes) logits of a classifier network in eval mode."""
    return torch.cat(list(forward_batches(net.eval(), images, spec, device, dtype)))


@torch.no_grad()
def fit_bn_statistics(encoder, images, spec, device, dtype=None):
    """Set each BN's running statistics to the mean and (unbiased) variance of its inputs over all
    `images`, in one forward pass in train mode (each batch normalised with its own statistics, as
    in training; no labels, no gradients), then eval mode. Exact over batches of any size: each
    batch's statistics are pooled in float64 (Chan et al.), not averaged as BN's momentum would."""
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    pooled = {}  # bn -> [count, mean (C,), sum of squared deviations (C,)]

    def record(bn, inputs):
        x = inputs[0].float()  # (B, C, ...)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dims, unbiased=False)  # (C,) each, of this batch
        n = x.numel() // x.shape[1]
        if bn not in pooled:
            pooled[bn] = [n, mean.double(), var.double() * n]
            return
        count, total_mean, m2 = pooled[bn]
        delta = mean.double() - total_mean
        both = count + n
        total_mean = total_mean + delta * n / both
        m2 = m2 + var.double() * n + delta ** 2 * count * n / both
        pooled[bn] = [both, total_mean, m2]

    hooks = [bn.register_forward_pre_hook(record) for bn in bns]
    try:
        for _ in forward_batches(encoder.train(), images, spec, device, dtype):
            pass
    finally:
        for hook in hooks:
            hook.remove()
    for bn, (count, mean, m2) in pooled.items():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(m2 / (count - 1))  # unbiased, as BN keeps it
    return encoder.eval()


@torch.no_grad()
def knn_predict(xtr, ytr, xte, classes, k=200, t=0.07, chunk=1024):
    """Class scores of a weighted kNN (InstDisc): cosine similarity, the k nearest vote with
    exp(sim / t)."""
    xtr = F.normalize(xtr, dim=1)
    xte = F.normalize(xte, dim=1)
    k = min(k, len(xtr))
    scores = []
    for i in range(0, len(xte), chunk):
        # sim, idx (b, k): the k largest of the (b, N_train) similarities of each query
        sim, idx = (xte[i:i + chunk] @ xtr.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=xte.device)
        scores.append(votes.scatter_add_(1, ytr[idx], (sim / t).exp()))  # (b, classes)
    return torch.cat(scores)


def topk(logits, y, k):
    """Top-k accuracy (%) of the logits (N, classes) against labels (N,), to 2 decimals."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices.cpu() == y[:, None]).any(dim=1)
    return round(hits.float().mean().item() * 100, 2)


# ------------------------------------------------------------------------------------------ results
def output_dir(args):
    if args.output_dir:
        return args.output_dir
    if args.ckpt:
        return os.path.dirname(os.path.abspath(args.ckpt[0]))
    return os.path.join("runs", "eval")


def save_results(out, data, args, rows, script, seconds, train_args, plots=()):
    """Add this script's rows to OUT/eval_DATASET[_val].json, which keeps the rows of the other
    evaluation script when they were made on the same checkpoint (make demo runs both), and draw
    label_fractions_DATASET[_val].png of them all.
    -> (the summary it holds, its path)"""
    path = os.path.join(out, f"eval_{data.dataset}{data.suffix}.json")
    ckpt = args.ckpt[0] if args.ckpt else None
    summary = {}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        if summary.get("ckpt") != ckpt or summary.get("train_samples") != len(data.train_labels):
            summary = {}  # another checkpoint's or another run's results: start again
    kept = [r for r in summary.get("results", []) if r.get("script") != script]
    rows = kept + [dict(r, script=script) for r in rows]
    rows.sort(key=lambda r: SCRIPTS.index(r["script"]))  # the frozen-feature protocols first
    eval_seconds = dict(summary.get("eval_seconds", {}), **{script: round(seconds, 1)})
    plots = sorted(set(summary.get("plots", [])) | set(plots))  # the other script's stay listed
    label_plot = plot_label_fractions(rows, out, data)  # of both scripts' rows
    if label_plot and label_plot not in plots:
        plots.append(label_plot)
    pretrain_seconds = train_args.get("train_seconds", 0.0)
    summary = {
        "top1": rows[0]["top1"] if rows else None, "top5": rows[0]["top5"] if rows else None,
        "ckpt": ckpt, "dataset": data.dataset, "eval_on": data.split,
        "train_samples": len(data.train_labels), "test_samples": len(data.eval_labels),
        "image_size": data.spec.size,
    }
    summary.update(headline(rows))
    summary.update(results=rows, plots=plots,
                   pretrain_seconds=round(pretrain_seconds, 1), eval_seconds=eval_seconds,
                   seconds=round(pretrain_seconds + sum(eval_seconds.values()), 1))
    atomic_write(path, lambda f: json.dump(summary, f, indent=1), mode="w")
    return summary, path


def headline(rows):
    """{ENCODER_top1} of the first protocol: simclr_top1, random_top1, pixels_top1; and
    {ENCODER_PROTOCOL_top1} of the other protocols, e.g. random_finetune_top1. Each protocol at all
    labels where it ran on all of them, else at its first label fraction (the demo fine-tunes on
    10%)."""
    out = {}
    first = rows[0]["protocol"] if rows else None
    fractions = {}  # protocol -> the label fractions it ran at, in order
    for r in rows:
        fractions.setdefault(r["protocol"], []).append(r["label_fraction"])
    # protocol -> the label fraction its headline reports
    main = {p: 1.0 if 1.0 in f else f[0] for p, f in fractions.items()}
    for r in rows:
        if r["label_fraction"] != main[r["protocol"]]:
            continue
        if r["protocol"] == first:
            key = f"{r['encoder']}_top1"
        else:
            key = f"{r['encoder']}_{r['protocol']}_top1"
        out.setdefault(key, r["top1"])
    return out


def result_name(r, results, init=False):
    """A result's name in tables and plots: 'simclr finetune head 1', with the rate where rates
    differ."""
    protocol = "init" if init and r["protocol"] == "finetune" else r["protocol"]
    name = f"{r['encoder']} {protocol}"
    if r.get("head_layers"):
        name += f" head {r['head_layers']}"
    rates = {x.get("lr") for x in results if x["protocol"] == r["protocol"]}
    if "lr" in r and len(rates) > 1:
        name += f" lr {r['lr']:g}"
    return name


def print_table(rows, data):
    if not rows:
        return
    head = ("encoder", "protocol", "labels", "top-1 %", "top-5 %")
    table = []
    for r in rows:
        encoder = r["encoder"]
        if r.get("variant"):  # which random network was reported
            encoder += f" ({r['variant']})"
        protocol = r["protocol"]
        if r.get("head_layers"):
            protocol += f" head {r['head_layers']}"
        if "lr" in r:
            protocol += f" lr {r['lr']:g}"
        table.append((encoder, protocol, f"{r['label_fraction']:g}", f"{r['top1']:.2f}",
                      f"{r['top5']:.2f}"))
    widths = [max(len(x[i]) for x in table + [head]) for i in range(5)]

    def line(cells):  # text columns to the left, numbers to the right
        padded = [v.ljust(w) if i < 3 else v.rjust(w)
                  for i, (v, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded)
    where = "test set"
    if data.split == "val":
        where = "validation images (held out of the training split)"
    print(f"\n{data.dataset} {where}")
    print(line(head))
    for cells in table:
        print(line(cells))
    print()


def plot_label_fractions(rows, out, data):
    """label_fractions_DATASET.png: accuracy against the fraction of training labels, per encoder
    and protocol, or None with a single fraction."""
    fractions = sorted({r["label_fraction"] for r in rows})
    if len(fractions) < 2:
        return None
    fig, (ax,) = figure(1, width=5.5, height=3.8)
    for key in dict.fromkeys(result_name(r, rows) for r in rows):  # in the order they ran
        same = [r for r in rows if result_name(r, rows) == key]
        same.sort(key=lambda r: r["label_fraction"])
        fractions = [r["label_fraction"] for r in same]
        ax.plot(fractions, [r["top1"] for r in same], marker="o", label=key)
    ax.set(xscale="log", xlabel="fraction of training labels", ylabel=f"{data.split} top-1 (%)",
           title=data.dataset)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, os.path.join(out, f"label_fractions_{data.dataset}{data.suffix}.png"))


def report(out, data, args, rows, script, t0, train_args, plots=()):
    """The end of an evaluation script: the table, the results file, its summary as last line."""
    plots = [p for p in plots if p]
    print_table(rows, data)
    summary, path = save_results(out, data, args, rows, script, time.time() - t0, train_args, plots)
    seconds = summary["eval_seconds"][script]
    saved = "".join(f", {p}" for p in summary["plots"])
    print(f"{data.dataset}: pretraining {summary['pretrain_seconds']:.0f} s + {script} "
          f"{seconds:.0f} s; saved {path}{saved}")
    print(json.dumps(summary))
    return summary


# ------------------------------------------------------------------- monitors during pretraining
class OnlineProbe:
    """A linear classifier trained alongside pretraining (train.py --probe) on the detached features
    h of the labelled images of each batch (label -1: skipped), with its own optimiser: it never
    touches the encoder's gradients."""

    def __init__(self, feat_dim, classes, device):
        self.head = torch.nn.Linear(feat_dim, classes).to(device)
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=1e-3, weight_decay=1e-4)
        self.correct = torch.zeros((), device=device)
        self.seen = torch.zeros((), device=device)

    def step(self, h, y):
        keep = (y >= 0).float()  # weights, not a boolean index: no host sync
        logits = self.head(h.float())  # (2n, classes)
        losses = F.cross_entropy(logits, y.clamp(min=0), reduction="none")  # (2n,)
        loss = (losses * keep).sum() / keep.sum().clamp(min=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.correct += ((logits.argmax(1) == y).float() * keep).sum().detach()
        self.seen += keep.sum()

    def accuracy(self, world):
        """Top-1 (%) on the training views since the last call, over all ranks (None: no labels).
        Under torchrun a collective: every rank calls it."""
        counts = torch.stack([self.correct, self.seen])
        if world > 1:
            dist.all_reduce(counts)
        self.correct.zero_()
        self.seen.zero_()
        correct, seen = counts.tolist()
        return round(100 * correct / seen, 2) if seen else None

    def state_dict(self):
        return {"head": self.head.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])


class KnnMonitor:
    """kNN top-1 of an encoder's features on a fixed random draw of labelled train and test images,
    in eval mode (its BN statistics untouched): train.py --probe, every --knn-every epochs."""

    def __init__(self, train_images, train_labels, test_images, test_labels, spec, device):
        self.train_images = train_images
        self.train_labels = train_labels
        self.test_images = test_images
        self.test_labels = test_labels
        self.spec = spec
        self.device = device

    @classmethod
    def from_dataset(cls, dataset, data_dir, spec, samples, seed, device):
        """`samples` = (train, test) images drawn with `seed`; None where the dataset has no
        labelled train and test splits."""
        try:
            train_set = get_dataset(dataset, data_dir, "train", download=False)
            test_set = get_dataset(dataset, data_dir, "test", download=False)
        except DatasetError as e:
            print(f"note: no kNN monitor ({e})")
            return None
        xtr, ytr = uint8_images(train_set, spec.size)
        xte, yte = uint8_images(test_set, spec.size)
        g = torch.Generator().manual_seed(seed)
        pick_train = torch.randperm(len(ytr), generator=g)[:samples[0]]
        pick_test = torch.randperm(len(yte), generator=g)[:samples[1]]
        return cls(xtr[pick_train], ytr[pick_train], xte[pick_test], yte[pick_test], spec, device)

    def top1(self, encoder, dtype=None):
        encoder.eval()
        train = features(encoder, self.train_images, self.spec, self.device, dtype, "kNN train")
        test = features(encoder, self.test_images, self.spec, self.device, dtype, "kNN test")
        encoder.train()
        classes = int(max(self.train_labels.max(), self.test_labels.max())) + 1
        scores = knn_predict(train, self.train_labels, test, classes)
        return round((scores.argmax(1) == self.test_labels).float().mean().item() * 100, 2)

    def log(self, run, encoder, dtype, every, step, epoch):
        """After every `every` epochs: the top-1 printed and logged in the run's metrics.jsonl."""
        if (epoch + 1) % every:
            return
        top1 = self.top1(encoder, dtype)
        tqdm.write(f"epoch {epoch}: kNN top-1 {top1:.2f}% "
                   f"({len(self.train_labels)} / {len(self.test_labels)} images)")
        run.log({"step": step, "epoch": epoch, "knn_top1": top1})
