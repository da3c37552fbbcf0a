"""SimCLR pretraining (arXiv 2002.05709): two augmented views per image, a ResNet encoder with an MLP head,
the NT-Xent loss, LARS with warmup and cosine decay, in one hand-written AMP loop. The same file runs as
`python train.py` and as `torchrun --nproc_per_node K train.py` (DDP, negatives from every rank).
"""
import argparse
import itertools
import json
import logging
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from augment import BatchAugment, SimCLRTransform, eval_batch, save_preview
from data import DATASETS, DatasetError, TwoViewBatches, get_dataset, labels, uint8_images
from loss import nt_xent
from model import ARCHS, SimCLR, convert_global_bn

BASE_LR = {"lars": 0.3, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}  # per 256 images


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR pretraining", add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="stl10", choices=list(DATASETS), help="(default: %(default)s)")
    g.add_argument("--data-dir", default=None,
                   help="dataset root (default: ./data; fashion-mnist tries /usr/share/datasets/fashion-mnist "
                        "first); for 'folder', the image folder")
    g.add_argument("--split", default=None,
                   help="pretraining split (default: stl10 train+unlabeled, its 105k images; folder: unlabeled, "
                        "i.e. DIR/train or DIR; else train)")
    g.add_argument("--image-size", type=int, default=None,
                   help="side of the views (default: the dataset's, 96 STL-10, 32 CIFAR, 28 Fashion-MNIST, 224 folder)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="let torchvision download a missing dataset (default: %(default)s)")
    g.add_argument("--pipeline", default="batched", choices=("batched", "per-image"),
                   help="batched: the dataset held as one uint8 tensor on the device, both views augmented as whole "
                        "batches there (BatchAugment); the default on CUDA and on CPU, where bench.py measures it "
                        "faster. per-image: SimCLRTransform in DataLoader workers, for data too large for memory "
                        "(default: %(default)s)")
    g.add_argument("--aug-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile BatchAugment's elementwise kernels (default: on for the CPU, where bench.py "
                        "measures it several times faster; with --compile on CUDA)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loader processes per rank for --pipeline per-image (default: %(default)s)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=ARCHS, help="torchvision ResNet (default: %(default)s)")
    g.add_argument("--width", type=float, default=1.0,
                   help="width multiplier of every layer, the paper's 1x/2x/4x; below 1 for CPU runs (default: %(default)s)")
    g.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 first conv and no max-pool (default: on for images of 64 px or less)")
    g.add_argument("--stem-stride", type=int, default=1, choices=(1, 2),
                   help="stride of the small stem's 3x3 conv; 2 quarters the compute at 28-32 px (default: %(default)s)")
    g.add_argument("--proj-dim", type=int, default=128, help="output size of the projection head (default: %(default)s)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="global BN over the batch of all ranks, the paper's (default: on when world > 1): torch's "
                        "SyncBatchNorm on CUDA, model.GlobalBatchNorm elsewhere")

    g = p.add_argument_group("augmentation (paper, appendix A)")
    g.add_argument("--jitter-strength", type=float, default=None,
                   help="colour distortion strength s (default: 1.0; 0.5 on CIFAR as in the paper)")
    g.add_argument("--jitter-p", type=float, default=0.8, help="probability of colour jitter (default: %(default)s)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0),
                   help="area range of the random resized crop (default: %(default)s)")
    g.add_argument("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3),
                   help="aspect ratio range of the crop (default: %(default)s)")
    g.add_argument("--flip-p", type=float, default=0.5, help="horizontal flip probability (default: %(default)s)")
    g.add_argument("--gray-p", type=float, default=0.2, help="grayscale probability (default: %(default)s)")
    g.add_argument("--blur-p", type=float, default=None,
                   help="Gaussian blur probability (default: 0.5; 0 for images of 32 px or less, as on CIFAR)")
    g.add_argument("--blur-sigma", type=float, nargs=2, default=(0.1, 2.0), help="blur sigma range (default: %(default)s)")
    g.add_argument("--rotate-p", type=float, default=0.0,
                   help="probability of a 90/180/270 degree rotation, the paper's ablation (default: %(default)s)")
    g.add_argument("--solarize-p", type=float, default=0.0, help="solarization probability (default: %(default)s)")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=512,
                   help="global batch N over all ranks (default: %(default)s; the paper's best is 4096)")
    g.add_argument("--epochs", type=int, default=100, help="(default: %(default)s, the paper's ablations)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after at most this many optimiser steps (the run also ends after --epochs); the "
                        "schedule is fitted to the shorter run (default: %(default)s, the full --epochs)")
    g.add_argument("--temperature", type=float, default=0.5,
                   help="tau of NT-Xent (default: %(default)s, the paper's choice for batches of a few hundred)")
    g.add_argument("--optimizer", default="lars", choices=("lars", "sgd", "adam", "adamw"),
                   help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=None,
                   help="base learning rate per 256 images, scaled by batch/256 (default: lars 0.3 as in the paper, "
                        "sgd 0.05, adam/adamw 1e-3)")
    g.add_argument("--weight-decay", type=float, default=1e-6, help="(default: %(default)s; not on biases and BN)")
    g.add_argument("--momentum", type=float, default=0.9, help="LARS/SGD momentum (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup, then cosine decay (default: %(default)s)")
    g.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"),
                   help="autocast dtype (default: %(default)s; fp16 with a GradScaler where CUDA lacks bf16)")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: %(default)s; under torchrun each rank takes cuda:LOCAL_RANK)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format, faster convolutions with AMP (default: %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--output-dir", default=None, help="(default: runs/DATASET)")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from (default: OUTPUT_DIR/last.pt when it exists)")
    g.add_argument("--save-every", type=int, default=0,
                   help="also write last.pt every this many steps (default: %(default)s, only at epoch ends)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines (default: %(default)s)")
    g.add_argument("--preview", action="store_true",
                   help="write OUTPUT_DIR/augmentations.png and exit (default: %(default)s)")
    g.add_argument("--probe", action="store_true",
                   help="monitor with labels: an online linear probe on detached features (it never touches the "
                        "encoder's gradients) and a kNN classifier every --knn-every epochs, into metrics.jsonl "
                        "and curves.png; images without labels (STL-10's unlabeled) are skipped (default: %(default)s)")
    g.add_argument("--knn-every", type=int, default=1, help="epochs between kNN monitors with --probe (default: %(default)s)")
    g.add_argument("--knn-samples", type=int, nargs=2, default=(10000, 5000), metavar=("TRAIN", "TEST"),
                   help="labelled train and test images of the kNN monitor (default: %(default)s)")
    return p


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (what is wrong, then --help), exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def die(msg, every_rank=False):
    """One actionable line on stderr and exit code 2, never a traceback. Under torchrun only rank 0 speaks,
    unless the error may be one rank's alone (every_rank): then each rank that meets it says so."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or every_rank:
        prefix = f"[rank {rank}] " if every_rank and int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        tqdm.write(f"{prefix}error: {msg}", file=sys.stderr)  # on its own line, also below a progress bar
    sys.exit(2)


def check_device(name):
    """The torch.device of --device, or one line saying why it cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"--device {name} is not a device: use cpu, cuda or cuda:K")
    if device.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {name}, but torch finds no CUDA GPU here: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        die(f"--device {name}, but there are {n} GPUs: use cuda:0 ... cuda:{n - 1}")
    return device


def make_writable_dir(path, what, fix):
    """Create `path` and check that a file can be written in it, before any work; else one line naming `what`."""
    try:
        os.makedirs(path, exist_ok=True)
        test_file = os.path.join(path, f".write-test{os.getpid()}")
        open(test_file, "w").close()
        os.remove(test_file)
    except OSError as e:
        die(f"{what} is not writable ({e.strerror}): {fix}")


def read_jsonl(path):
    """The rows of a JSON-lines file; a line torn by a kill while it was written is skipped."""
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def resolve_args(args, world_size=1):
    """Fill the dataset-dependent defaults in place and reject bad values with one line."""
    info = DATASETS[args.dataset]
    args.split = args.split or info["pretrain_split"]
    args.image_size = info["size"] if args.image_size is None else args.image_size
    if args.cifar_stem is None:
        args.cifar_stem = args.image_size <= 64
    if args.jitter_strength is None:
        args.jitter_strength = 0.5 if args.dataset.startswith("cifar") else 1.0
    if args.lr is None:
        args.lr = BASE_LR[args.optimizer]
    args.output_dir = args.output_dir or os.path.join("runs", args.dataset)
    if args.sync_bn is None:
        args.sync_bn = world_size > 1
    for name in ("temperature", "lr", "epochs", "image_size", "width", "proj_dim"):
        if not getattr(args, name) > 0:
            die(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_size < 2:
        die(f"--batch-size must be at least 2 (each image needs other images as negatives), got {args.batch_size}")
    if args.batch_size % world_size:
        die(f"--batch-size {args.batch_size} does not divide over {world_size} ranks: use a multiple of {world_size}")
    if args.max_steps is not None and args.max_steps < 1:
        die(f"--max-steps must be at least 1, got {args.max_steps}")
    for name in ("jitter_p", "flip_p", "gray_p", "blur_p", "rotate_p", "solarize_p"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) <= 1:
            die(f"--{name.replace('_', '-')} is a probability: use a value in [0, 1], got {getattr(args, name)}")
    if not 0 <= args.jitter_strength <= 2.5:
        die(f"--jitter-strength s must be in [0, 2.5] (hue jitter 0.2 s is at most 0.5), got {args.jitter_strength}")
    ranges = {"crop_scale": (0, 1), "crop_ratio": (0, math.inf), "blur_sigma": (0, math.inf)}
    for name, (low, high) in ranges.items():
        a, b = getattr(args, name)
        if not low < a <= b <= high:
            die(f"--{name.replace('_', '-')} takes MIN MAX with {low} < MIN <= MAX" + (f" <= {high}" if high < math.inf
                else "") + f", got {a} {b}")
    for name, low in (("log_every", 1), ("save_every", 0), ("workers", 0), ("knn_every", 0), ("warmup_epochs", 0),
                      ("weight_decay", 0)):
        if not getattr(args, name) >= low:
            die(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if min(args.knn_samples) < 1:
        die(f"--knn-samples takes two positive counts, got {args.knn_samples}")
    return args


# ---------------------------------------------------------------------------------------------- optimisation

def lr_at(step, peak_lr, warmup_steps, total_steps):
    """Learning rate of optimiser step `step` (0-based): linear warmup to peak_lr, then cosine decay to 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as SimCLR uses it: SGD with momentum where each layer's update is scaled by the
    trust ratio eta * ||w|| / ||g + wd * w||. Param groups with lars=False (biases, BN) get neither weight
    decay nor the trust ratio. The step uses foreach kernels: one launch per op for all the layers."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))  # (L,)
                g_norm = torch.stack(torch._foreach_norm(grads))  # (L,)
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                    torch.ones_like(w_norm))
                torch._foreach_mul_(grads, list(trust.unbind()))
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


def build_optimizer(model, args, lr):
    """Biases and BN parameters (ndim <= 1) are excluded from weight decay and from the LARS adaptation."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0, lars=False)]
    if args.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    for g in groups:
        g.pop("lars", None)
    fast = dict(fused=True) if args.device.startswith("cuda") else dict(foreach=True)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, **fast)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, weight_decay=args.weight_decay, **fast)


# ------------------------------------------------------------------------------------------------- data

def augment_kwargs(args):
    info = DATASETS[args.dataset]
    return dict(s=args.jitter_strength, crop_scale=args.crop_scale, crop_ratio=args.crop_ratio, flip_p=args.flip_p,
                jitter_p=args.jitter_p, gray_p=args.gray_p, blur_p=args.blur_p, blur_sigma=args.blur_sigma,
                rotate_p=args.rotate_p, solarize_p=args.solarize_p, mean=info["mean"], std=info["std"])


def build_views(base, args, rank, world, device):
    """The rank's two-view batches, from the batched or the per-image pipeline (data.TwoViewBatches)."""
    if args.pipeline == "batched":
        compile_aug = args.aug_compile if args.aug_compile is not None else device.type == "cpu" or args.compile
        aug = BatchAugment(args.image_size, **augment_kwargs(args), compile=compile_aug).to(device)
        return TwoViewBatches(base, args.batch_size // world, rank, world, args.seed, device, batch_augment=aug,
                              image_size=args.image_size)
    return TwoViewBatches(base, args.batch_size // world, rank, world, args.seed, device,
                          transform=SimCLRTransform(args.image_size, **augment_kwargs(args)), workers=args.workers,
                          worker_init_fn=ignore_sigint)


# ---------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Atomic: write a temp file in the same folder, flush it to disk, then os.replace."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path, obj):
    """Atomic, like save_checkpoint: a result already written is never left half-overwritten."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load with weights_only=True (a checkpoint cannot run code); any bad file is one line."""
    if not os.path.isfile(path):
        die(f"checkpoint {path} does not exist: check the path (train.py writes OUTPUT_DIR/last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "use a last.pt written by train.py")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        die(f"{path} is not a SimCLR checkpoint of train.py (no 'model'/'args' entries)")
    return ckpt


MODEL_ARGS = ("arch", "width", "cifar_stem", "stem_stride", "proj_dim")


def describe(a):
    return ", ".join(f"{k} {a.get(k)}" for k in MODEL_ARGS if k in a)


def load_model_state(model, ckpt, path, wanted=None):
    """Strict load; a checkpoint of another architecture is one line naming both."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        asked = f", but this run asks for {describe(wanted)}" if wanted else ""
        die(f"{path} holds a model with {describe(ckpt['args'])}{asked}: pass the checkpoint's --arch/--width/"
            "--cifar-stem/--stem-stride/--proj-dim, or another --output-dir")


def rng_states():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_states(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))


# ------------------------------------------------------------------------------------------------- logging

def plot_curves(metrics_path, out_path):
    """curves.png: loss, learning rate and the --probe monitors against the step, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(metrics_path)
    logs = [r for r in rows if "loss" in r]
    if not logs:
        return
    probe = [r for r in logs if r.get("probe_top1") is not None]
    knn = [r for r in rows if "knn_top1" in r]
    fig, axes = plt.subplots(1, 3 if probe or knn else 2, figsize=(15 if probe or knn else 10, 3.5))
    axes[0].plot([r["step"] for r in logs], [r["loss"] for r in logs])
    axes[0].set(xlabel="step", ylabel="NT-Xent loss", title="loss")
    axes[1].plot([r["step"] for r in logs], [r["lr"] for r in logs])
    axes[1].set(xlabel="step", ylabel="learning rate", title="lr")
    if probe or knn:
        axes[2].plot([r["step"] for r in probe], [r["probe_top1"] for r in probe], label="online linear probe (train)")
        axes[2].plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], marker="o", label="kNN (test)")
        axes[2].set(xlabel="step", ylabel="top-1 (%)", title="monitors")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------- main

def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process. -> (rank, world, device)"""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, check_device(args.device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = check_device(f"cuda:{local}") if args.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world, device


def amp_dtype(name, device):
    if name == "off":
        return None
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("bf16 is not supported on this GPU: using fp16 with a GradScaler")
        return torch.float16
    return torch.bfloat16 if name == "bf16" else torch.float16


def main(args):
    # torch.compile of the augmentation on a CPU-only machine warns that CUDA_HOME has no CUDA: noise, not news
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    rank, world, device = setup_distributed(args)
    try:
        train(args, rank, world, device)
    except torch.OutOfMemoryError:
        die(f"out of memory on {device} with --batch-size {args.batch_size} ({args.batch_size // world} per rank): "
            "use a smaller --batch-size (the learning rate scales with it), or more GPUs", every_rank=True)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, keeping the last checkpoint
        out = args.output_dir or os.path.join("runs", args.dataset)
        print(f"\ninterrupted; {os.path.join(out, 'last.pt')} holds the last checkpoint: rerun the same "
              "command to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second signal stops at once). Under
    torchrun the ranks agree through a small gloo all_reduce, so that they all stop after the same step."""

    def __init__(self, world):
        self.signal = None
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        self.restore()

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def __bool__(self):
        """Whether to stop now; under torchrun a collective call, made by every rank after the same step."""
        if self.group is None:
            return self.signal is not None
        flag = torch.tensor([self.signal is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item() and self.signal is None:
            self.signal = "a signal to another rank"
        return bool(flag.item())


def ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which finishes the step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_step(net, views, optimizer, scaler, dtype, temperature, channels_last=True, probe=None, labels=None):
    """One optimiser step on (2n, 3, S, S) views; returns the detached loss (no host sync)."""
    n = views.shape[0] // 2
    if channels_last:
        views = views.contiguous(memory_format=torch.channels_last)
    with torch.autocast(views.device.type, dtype=dtype, enabled=dtype is not None):
        h, z = net(views)  # (2n, feat_dim), (2n, proj_dim)
    loss = nt_xent(z[:n], z[n:], temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # unscales first: LARS sees the true gradients
    scaler.update()
    if probe is not None:
        probe.step(h.detach(), torch.cat([labels, labels]))
    return loss.detach()


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
    """kNN top-1 (%) of the encoder's features, in eval mode (its BN statistics untouched)."""
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
    """(train images, labels, test images, labels) for the kNN monitor, or None where the data has no labels."""
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


def build_model(args, world, device):
    model = SimCLR(args.arch, args.proj_dim, args.cifar_stem, args.width, stem_stride=args.stem_stride)
    if world > 1 and args.sync_bn:  # global BN: statistics of the whole batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_global_bn(model)
    return model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)


def train(args, rank, world, device):
    resolve_args(args, world)
    main_rank = rank == 0
    out = args.output_dir
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    local_main = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world > 1 and not local_main:
        dist.barrier()  # the first rank of each machine reads the dataset first: it may be downloading it
    try:
        base = get_dataset(args.dataset, args.data_dir, args.split, download=args.download and local_main)
    except DatasetError as e:
        die(str(e), every_rank=True)
    if world > 1 and local_main:
        dist.barrier()
    make_writable_dir(out, f"--output-dir {out}", "pass a folder you can write to")
    transform = SimCLRTransform(args.image_size, **augment_kwargs(args))
    if args.preview:
        if main_rank:
            path = save_preview([base[i][0] for i in range(min(8, len(base)))], transform,
                                os.path.join(out, "augmentations.png"), seed=args.seed)
            print(f"wrote {path}")
        return
    if args.batch_size > len(base):
        die(f"--batch-size {args.batch_size} is larger than the {len(base)} images of {args.dataset} "
            f"{args.split}: with drop_last nothing would train; use at most {len(base)}")

    views = build_views(base, args, rank, world, device)
    steps_per_epoch = views.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    # the schedule spans the run that happens: a run cut by --max-steps gets a proportionally shorter warmup
    warmup_steps = min(total_steps, round(args.warmup_epochs * total_steps / args.epochs))
    peak_lr = args.lr * args.batch_size / 256  # linear scaling rule, on the global batch
    schedule = partial(lr_at, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps)

    model = build_model(args, world, device)
    optimizer = build_optimizer(model, args, peak_lr)
    probe, knn = None, None
    if args.probe:
        classes = DATASETS[args.dataset]["num_classes"] or int(labels(base).max()) + 1
        probe = OnlineProbe(model.feat_dim, max(classes, 1), device) if classes > 0 else None
        knn = knn_monitor_data(args) if main_rank and args.knn_every > 0 else None
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    step, train_seconds = 0, 0.0
    ckpt_path = os.path.join(out, "last.pt")
    resume = args.resume or (ckpt_path if os.path.exists(ckpt_path) else None)
    if resume:
        ckpt = load_checkpoint(resume)
        load_model_state(model, ckpt, resume, vars(args))
        for flag in ("optimizer", "amp"):
            if ckpt["args"].get(flag, getattr(args, flag)) != getattr(args, flag):
                die(f"{resume} was trained with --{flag} {ckpt['args'][flag]}, this run asks for --{flag} "
                    f"{getattr(args, flag)}: resume with --{flag} {ckpt['args'][flag]}, or use another --output-dir")
        if ckpt.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
            die(f"{resume} was written with {ckpt['steps_per_epoch']} steps per epoch, this run has "
                f"{steps_per_epoch}: resume with the same dataset and --batch-size "
                f"({ckpt['args'].get('batch_size')}), or use another --output-dir")
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if probe is not None and "probe" in ckpt:
            probe.load_state_dict(ckpt["probe"])
        set_rng_states(ckpt["rng"])
        step, train_seconds = ckpt["step"], ckpt.get("train_seconds", 0.0)
        if main_rank:
            print(f"resumed from {resume} at step {step} (epoch {step // steps_per_epoch})", flush=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if main_rank:
        print(json.dumps({"args": vars(args), "git": git_sha(), "world_size": world}), flush=True)
        if os.path.exists(metrics_path):  # drop lines logged after the checkpoint we resume from
            keep = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= step]
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
        if not resume:
            save_preview([base[i][0] for i in range(min(8, len(base)))], transform,
                         os.path.join(out, "augmentations.png"), seed=args.seed)
    if step >= total_steps:
        if main_rank:
            print(f"{resume} has already run {step} of {total_steps} steps: nothing to do")
        return

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:  # after DDP, the order torch supports
        net = torch.compile(net)

    def checkpoint():
        if main_rank:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict(), "epoch": step // steps_per_epoch,
                                        "step": step, "steps_per_epoch": steps_per_epoch,
                                        "args": vars(args), "rng": rng_states(),
                                        **({"probe": probe.state_dict()} if probe is not None else {}),
                                        "train_seconds": train_seconds + time.time() - t_start})

    def global_losses(window):
        """The window's losses averaged over the ranks: every rank sees the same numbers and decides alike."""
        losses = torch.stack(window).float()
        if world > 1:
            dist.all_reduce(losses)
            losses /= world
        return losses

    def check_finite(window):
        """The window's global losses; a non-finite one stops the run, keeping the last good checkpoint."""
        losses = global_losses(window)
        bad = [i for i, x in enumerate(losses.tolist()) if not math.isfinite(x)]
        if bad:
            where = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written yet"
            die(f"loss is not finite at step {step - len(window) + bad[0] + 1}; {where}: lower --lr, raise "
                f"--temperature or use --amp bf16/off")
        return losses

    t_start = time.time()
    net.train()
    stop, stopped = StopRequest(world), False
    try:
        while step < total_steps and not stopped:
            epoch, start = divmod(step, steps_per_epoch)
            n_steps = min(steps_per_epoch, start + total_steps - step) - start
            bar = tqdm(itertools.islice(views.epoch(epoch, start), n_steps), total=n_steps, desc=f"epoch {epoch}",
                       disable=True if not main_rank else None, dynamic_ncols=True)  # None: off when not a tty
            window, epoch_losses, t_log, n_log = [], [], time.time(), 0
            for x, y in bar:
                lr = schedule(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                window.append(train_step(net, x, optimizer, scaler, dtype, args.temperature, args.channels_last,
                                         probe, y))
                step += 1
                n_log += args.batch_size
                if step % args.log_every == 0 or step == total_steps or step % steps_per_epoch == 0:
                    losses = check_finite(window).mean().item()
                    epoch_losses.append((losses, len(window)))
                    img_s = n_log / (time.time() - t_log)
                    record = {"step": step, "epoch": epoch, "loss": losses, "lr": lr, "img_s": img_s,
                              "time": train_seconds + time.time() - t_start}
                    if probe is not None:
                        record["probe_top1"] = probe.accuracy(world)
                    if main_rank:
                        bar.set_postfix(loss=f"{losses:.4f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}")
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    window, t_log, n_log = [], time.time(), 0
                if args.save_every and step % args.save_every == 0:
                    if window:
                        check_finite(window)
                    checkpoint()
                if stop and step < total_steps:
                    if window:
                        check_finite(window)
                    checkpoint()
                    stopped = True
                    break
            bar.close()
            if stopped:
                if main_rank:
                    print(f"stopped by {stop.signal} after step {step}; saved {ckpt_path}. Resume with the same command: "
                          f"python {shlex.join(sys.argv)}", flush=True)
                return
            if window:
                check_finite(window)
            checkpoint()
            if knn is not None and (epoch + 1) % args.knn_every == 0:
                top1 = knn_monitor(model.encoder, knn, args, device, dtype)
                print(f"epoch {epoch}: kNN top-1 {top1:.2f}% ({len(knn[1])} train / {len(knn[3])} test images)", flush=True)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, "epoch": epoch, "knn_top1": top1}) + "\n")
            if main_rank:
                plot_curves(metrics_path, os.path.join(out, "curves.png"))
                mean = sum(loss * k for loss, k in epoch_losses) / max(1, sum(k for _, k in epoch_losses))
                print(f"epoch {epoch} done: step {step}/{total_steps}, mean loss {mean:.4f}, saved {ckpt_path}", flush=True)
    finally:
        stop.restore()
    if main_rank:
        print(f"finished {total_steps} steps in {train_seconds + time.time() - t_start:.0f} s; "
              f"evaluate with: python eval_linear.py --ckpt {ckpt_path}")


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
