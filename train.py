"""SimCLR pretraining (arXiv 2002.05709): two augmented views per image, a ResNet encoder with an
MLP head, the NT-Xent loss, LARS with warmup and cosine decay, in one hand-written AMP loop; the
same file runs as `python train.py` and under `torchrun` (DDP, negatives from every rank)."""
import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import evaluation as ev
from augment import BatchAugment, Recipe, SimCLRTransform, View, save_preview
from data import (DATASETS, DatasetError, TooLargeToHold, TwoViewBatches, get_dataset, labels,
                  uint8_images)
from harness import (Parser, StopRequest, add_device_flags, agree_on_resume, amp_dtype,
                     append_jsonl, at_least, autocast, changed_flags, checked, die, git_sha,
                     ignore_sigint, load_model_state, make_writable_dir, ordered_pair, plot_jsonl,
                     positive_float, positive_int, probability, rng_states, save_checkpoint,
                     save_json, seed_all, set_rng_states, setup_distributed, truncate_jsonl)
from loss import cached_backward, nt_xent
from model import ARCHS, INITS, SimCLR, convert_global_bn, param_groups, small_stem

BASE_LR = {"lars": 0.3, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}  # per 256 images
# Flags that cannot change what a run computes: a resumed run may pass other values. Every other
# flag must match the checkpoint's, but --sync-bn where one of the two runs had a single rank (it
# changes nothing there).
NEUTRAL = {"workers", "log_every", "save_every", "save_every_epochs", "save_every_minutes",
           "output_dir", "resume", "extend", "device", "data_dir", "download", "compile",
           "aug_compile", "channels_last", "probe", "knn_every", "knn_samples", "preview"}
EXTENDABLE = {"epochs", "max_steps"}  # what --extend may change
jitter_strength = checked(float, lambda s: 0 <= s <= 2.5,
                          "s must be in [0, 2.5] (hue jitter 0.2 s is at most 0.5)")


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR pretraining", add_help=False)
    on_off = argparse.BooleanOptionalAction  # --flag / --no-flag

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="stl10", choices=list(DATASETS),
                   help="(default: %(default)s)")
    g.add_argument("--data-dir",
                   help="dataset root, or the image folder (default: ./data; fashion-mnist: "
                        "Debian's folder first)")
    g.add_argument("--split",
                   help="(default: stl10 train+unlabeled, 105k images; folder: DIR/train or DIR; "
                        "else train)")
    g.add_argument("--image-size", type=positive_int,
                   help="side of the views (default: the dataset's, e.g. 96 for STL-10)")
    g.add_argument("--download", action=on_off, default=True,
                   help="torchvision downloads missing datasets (default: %(default)s)")
    g.add_argument("--pipeline", default="batched", choices=("batched", "per-image"),
                   help="batched: views made on the device by BatchAugment; per-image: "
                        "SimCLRTransform in DataLoader workers (default: %(default)s)")
    g.add_argument("--aug-compile", action=on_off,
                   help="torch.compile BatchAugment (default: on the CPU, and with --compile)")
    g.add_argument("--workers", type=at_least(0), default=min(8, os.cpu_count() or 1),
                   help="data loader processes per rank for --pipeline per-image (default: "
                        "%(default)s)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=ARCHS,
                   help="torchvision ResNet (default: %(default)s)")
    g.add_argument("--width", type=positive_float, default=1.0,
                   help="multiplier, the paper's 1x/2x/4x (default: %(default)s)")
    g.add_argument("--cifar-stem", action=on_off,
                   help="3x3 first conv, no max-pool (default: on for images up to 64 px)")
    g.add_argument("--stem-stride", type=int, default=1, choices=(1, 2),
                   help="of the small stem's conv (default: %(default)s)")
    g.add_argument("--proj-dim", type=positive_int, default=128,
                   help="output size of the projection head (default: %(default)s)")
    g.add_argument("--proj-layers", type=int, default=2, choices=(2, 3),
                   help="linear layers of the projection head: 2 is SimCLR's, 3 SimCLRv2's "
                        "(default: %(default)s)")
    g.add_argument("--proj-out-bn", action=on_off, default=True,
                   help="BN (scale, no shift) on the head's output, no bias: the official code's "
                        "head; off: the paper's formula, a bias and no BN (default: %(default)s)")
    g.add_argument("--init", default="official", choices=INITS,
                   help="the weights' initialisation; official: google-research/simclr's (convs "
                        "TF's variance scaling, fan-in, truncated normal; the head's dense layers "
                        "N(0, 0.01)); torchvision: kaiming fan-out and PyTorch's default (default: "
                        "%(default)s)")
    g.add_argument("--sync-bn", action=on_off,
                   help="BN over the batch of all ranks, the paper's global BN (default: on with "
                        "several ranks)")

    g = p.add_argument_group("augmentation (paper, appendix A)")
    g.add_argument("--jitter-strength", type=jitter_strength,
                   help="colour distortion strength s (default: 1.0; CIFAR 0.5)")
    g.add_argument("--jitter-p", type=probability, default=0.8,
                   help="probability of colour jitter (default: %(default)s)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0),
                   action=ordered_pair(0, 1),
                   help="area range of the random resized crop (default: %(default)s)")
    g.add_argument("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3),
                   action=ordered_pair(0),
                   help="aspect ratio range of the crop (default: %(default)s)")
    g.add_argument("--flip-p", type=probability, default=0.5,
                   help="horizontal flip probability (default: %(default)s)")
    g.add_argument("--gray-p", type=probability, default=0.2,
                   help="grayscale probability (default: %(default)s)")
    g.add_argument("--blur-p", type=probability,
                   help="Gaussian blur probability (default: 0.5; 0 up to 32 px, as on CIFAR)")
    g.add_argument("--blur-sigma", type=float, nargs=2, default=(0.1, 2.0), action=ordered_pair(0),
                   help="(default: %(default)s)")
    g.add_argument("--rotate-p", type=probability, default=0.0,
                   help="90/180/270 degree rotation (default: %(default)s)")
    g.add_argument("--solarize-p", type=probability, default=0.0,
                   help="solarization probability (default: %(default)s)")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=at_least(2), default=512,
                   help="global batch N over all ranks, at least 2: each image needs others as "
                        "negatives (default: %(default)s; the paper's best is 4096)")
    g.add_argument("--micro-batch", type=positive_int,
                   help="images per forward on each rank: the loss and gradients of the whole "
                        "batch by gradient caching, with this many images' memory; BN normalises "
                        "each micro-batch, as DDP without --sync-bn (default: the rank's batch)")
    g.add_argument("--epochs", type=positive_int, default=100,
                   help="(default: %(default)s, the paper's ablations)")
    g.add_argument("--max-steps", type=positive_int,
                   help="stop after this many steps, the schedule fitted to them")
    g.add_argument("--temperature", type=positive_float, default=0.5,
                   help="tau of NT-Xent (default: %(default)s, the official CIFAR-10 recipe; its "
                        "ImageNet flag is 0.1)")
    g.add_argument("--optimizer", default="lars", choices=("lars", "sgd", "adam", "adamw"),
                   help="(default: %(default)s)")
    g.add_argument("--lr", type=positive_float,
                   help="base learning rate per 256 images, scaled by batch/256 (default: lars 0.3 "
                        "as in the paper, sgd 0.05, adam/adamw 1e-3)")
    g.add_argument("--weight-decay", type=at_least(0, float), default=1e-6,
                   help="(default: %(default)s; not on biases and BN)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="LARS/SGD momentum (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=at_least(0, float), default=10,
                   help="linear, then cosine decay (default: %(default)s)")

    g = p.add_argument_group("run")
    add_device_flags(g)
    g.add_argument("--channels-last", action=on_off, default=True,
                   help="NHWC memory format (default: %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--output-dir", help="(default: runs/DATASET)")
    g.add_argument("--resume",
                   help="checkpoint to continue from (default: OUTPUT_DIR/last.pt when it exists)")
    g.add_argument("--extend", action="store_true",
                   help="resume with another --epochs/--max-steps on purpose (the schedule is "
                        "refitted to the new length); the change and its step go into the "
                        "checkpoint's history (default: %(default)s)")
    g.add_argument("--save-every", type=at_least(0), default=0,
                   help="also save every this many steps (default: %(default)s)")
    g.add_argument("--save-every-epochs", type=positive_int, default=1,
                   help="epochs between last.pt and curves.png, once --save-every-minutes have "
                        "passed too (the last epoch and a stop always save) (default: %(default)s)")
    g.add_argument("--save-every-minutes", type=at_least(0, float), default=1.0,
                   help="minutes of training at least between saves at an epoch's end: where an "
                        "epoch takes seconds (a fast GPU), saving each one would cost 10-20%% of "
                        "the time; 0 saves at every --save-every-epochs (default: %(default)s)")
    g.add_argument("--log-every", type=at_least(1), default=10,
                   help="steps between log lines (default: %(default)s)")
    g.add_argument("--preview", action="store_true",
                   help="write OUTPUT_DIR/augmentations.png and exit (default: %(default)s)")
    g.add_argument("--probe", action="store_true",
                   help="monitors with labels: an online linear probe on detached features and a "
                        "kNN classifier every --knn-every epochs, into metrics.jsonl and "
                        "curves.png (default: %(default)s)")
    g.add_argument("--knn-every", type=at_least(0), default=1,
                   help="epochs between --probe's kNN monitors (default: %(default)s)")
    g.add_argument("--knn-samples", type=positive_int, nargs=2, default=(10000, 5000),
                   metavar=("TRAIN", "TEST"),
                   help="labelled train and test images of the kNN monitor (default: %(default)s)")
    return p


def resolve_args(args, world_size=1):
    """Fill the dataset-dependent defaults in place and check --batch-size and --micro-batch against
    the ranks; the other flags are checked by their argparse types."""
    args.split = args.split or DATASETS[args.dataset]["pretrain_split"]
    if args.image_size is None:
        args.image_size = DATASETS[args.dataset]["size"]
    if args.cifar_stem is None:
        args.cifar_stem = small_stem(args.image_size)
    if args.jitter_strength is None:  # the paper's CIFAR recipe uses half the colour strength
        args.jitter_strength = 0.5 if args.dataset.startswith("cifar") else 1.0
    if args.lr is None:
        args.lr = BASE_LR[args.optimizer]
    args.output_dir = args.output_dir or os.path.join("runs", args.dataset)
    if args.sync_bn is None:
        args.sync_bn = world_size > 1
    if args.batch_size % world_size:
        die(f"--batch-size {args.batch_size} does not divide over {world_size} ranks: "
            f"use a multiple of {world_size}")
    per_rank = args.batch_size // world_size
    m = args.micro_batch
    if m and per_rank % m:
        fit = max(d for d in range(1, min(m, per_rank) + 1) if per_rank % d == 0)
        problem = "is larger than" if m > per_rank else "does not divide"
        die(f"--micro-batch {m} {problem} the {per_rank} images per rank "
            f"(--batch-size {args.batch_size} / {world_size} ranks): use a divisor of {per_rank}, "
            f"such as {fit}")
    return args


def main(args):
    # a CPU-only torch.compile of the augmentation warns that CUDA_HOME has no CUDA: noise
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    rank, world, device = setup_distributed(args.device)
    try:
        train(args, rank, world, device)
    except torch.OutOfMemoryError:
        smaller = "a smaller " if args.micro_batch else ""
        die(f"out of memory on {device} with --batch-size {args.batch_size} "
            f"({args.batch_size // world} per rank): use {smaller}--micro-batch (the same step "
            "with the memory of fewer images), a smaller --batch-size (the learning rate scales "
            "with it), or more GPUs", every_rank=True)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, keeping the last checkpoint
        out = os.path.join(args.output_dir or os.path.join("runs", args.dataset), "last.pt")
        print(f"\ninterrupted; {out} holds the last checkpoint: rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device):
    resolve_args(args, world)
    # each rank its own seed: its own draws; DDP copies rank 0's weights to every rank at the start
    seed_all(args.seed + rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick kernels
    base = pretraining_data(args, world)
    make_writable_dir(args.output_dir, f"--output-dir {args.output_dir}",
                      "pass a folder you can write to")
    if args.preview:
        if rank == 0:
            print(f"wrote {preview(base, args)}")
        return
    if args.batch_size > len(base):
        die(f"--batch-size {args.batch_size} is larger than the {len(base)} images of "
            f"{args.dataset} {args.split}: with drop_last nothing would train; use at most "
            f"{len(base)}")
    # the two augmented views of each image of a batch (appendix A), made on the device by default
    views = build_views(base, args, rank, world, device)

    # the schedule is a pure function of the step, so a resumed run takes the same rates; it spans
    # the run that happens: a run cut by --max-steps gets a proportionally shorter warmup
    total_steps = min(args.epochs * views.steps_per_epoch, args.max_steps or math.inf)
    warmup_steps = min(total_steps, round(args.warmup_epochs * total_steps / args.epochs))
    # the linear scaling rule, on the global batch: 0.3 x 4096 / 256 = 4.8 is the paper's peak
    peak_lr = args.lr * args.batch_size / 256
    schedule = partial(lr_at, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps)

    # encoder f and projection head g; LARS, because large batches need a step size per layer
    model = build_model(args, world, device)
    optimizer = build_optimizer(model, args, peak_lr)
    dtype = amp_dtype(args.amp, device)
    # only fp16 needs loss scaling: bf16 has float32's exponent range
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    run = Run(args, rank, world, device, dtype, model, optimizer, scaler, views.steps_per_epoch)
    if args.probe:
        run.probe, run.knn = build_monitors(args, base, model, rank, device)

    # a rerun of the same command continues where the last checkpoint stopped
    step = run.resume()
    if rank == 0:
        print(json.dumps({"args": vars(args), "git": git_sha(), "world_size": world}), flush=True)
        if step == 0:
            preview(base, args)
    if step >= total_steps:
        if rank == 0:
            print(f"{run.resumed_from} has already run {step} of {total_steps} steps: "
                  "nothing to do")
        return
    net = model
    if world > 1:
        device_ids = [device] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    loop(run, net, views, schedule, step, total_steps)


# --------------------------------------------------------------------------------------------- data
def pretraining_data(args, world):
    """The pretraining split, read (perhaps downloaded) first by each machine's first rank."""
    local_main = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world > 1 and not local_main:
        dist.barrier()
    try:
        download = args.download and local_main
        base = get_dataset(args.dataset, args.data_dir, args.split, download=download)
    except DatasetError as e:
        die(str(e), every_rank=True)
    if world > 1 and local_main:
        dist.barrier()
    return base


def view(args):
    info = DATASETS[args.dataset]
    return View(args.image_size, info["mean"], info["std"])


def recipe(args):
    """The augmentation's distributions from the flags (augment.Recipe)."""
    return Recipe(s=args.jitter_strength, crop_scale=args.crop_scale, crop_ratio=args.crop_ratio,
                  flip_p=args.flip_p, jitter_p=args.jitter_p, gray_p=args.gray_p,
                  blur_p=args.blur_p, blur_sigma=args.blur_sigma, rotate_p=args.rotate_p,
                  solarize_p=args.solarize_p)


def preview(base, args):
    """OUTPUT_DIR/augmentations.png: eight images and their two views, at most 512 px a side: crops
    and the blur (10% of the side) are relative to the image, so larger views would look the same at
    many times the cost (4096 px views: a 12k x 33k px picture)."""
    images = [base[i][0] for i in range(min(8, len(base)))]
    path = os.path.join(args.output_dir, "augmentations.png")
    shown = view(args)
    if shown.size > 512:
        shown = View(512, shown.mean, shown.std)
    return save_preview(images, SimCLRTransform(shown, recipe(args)), path, seed=args.seed)


def build_views(base, args, rank, world, device):
    """The rank's two-view batches, batched or per image (data.TwoViewBatches)."""
    per_rank = args.batch_size // world
    if args.pipeline == "per-image":
        transform = SimCLRTransform(view(args), recipe(args))
        return TwoViewBatches(base, per_rank, rank, world, args.seed, device, transform=transform,
                              workers=args.workers, worker_init_fn=ignore_sigint)
    compile_aug = args.aug_compile
    # the CPU's elementwise kernels gain 10x; a GPU gains with the model's compile
    if compile_aug is None:
        compile_aug = device.type == "cpu" or args.compile
    aug = BatchAugment(view(args), recipe(args), compile=compile_aug).to(device)
    try:
        return TwoViewBatches(base, per_rank, rank, world, args.seed, device, batch_augment=aug,
                              image_size=args.image_size)
    except TooLargeToHold as e:
        die(f"{e}: use --pipeline per-image (decodes each image when it is needed) or a smaller "
            "--image-size", every_rank=True)
    except DatasetError as e:
        die(str(e), every_rank=True)


# ------------------------------------------------------------------------------ model and optimiser
def build_model(args, world, device):
    model = SimCLR.from_args(vars(args))
    if world > 1 and args.sync_bn:  # global BN: statistics of the whole batch
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = convert_global_bn(model)  # SyncBatchNorm has GPU kernels only
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)


def build_optimizer(model, args, lr):
    """Biases and BN parameters are excluded from weight decay and from the LARS adaptation."""
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    fast = dict(fused=True) if args.device.startswith("cuda") else dict(foreach=True)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, **fast)
    adam = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return adam(groups, lr=lr, **fast)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in the official SimCLR code (lars_optimizer.py):
    g = grad + wd w, trust ratio eta ||w|| / ||g||, classic momentum with the rate inside:
    v = m v + lr trust g, w -= v. Groups with lars=False (biases, BN) get neither weight decay nor
    the trust ratio. Foreach kernels: one launch per op for all layers."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
        super().__init__(params, defaults)

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
                ratio = group["eta"] * w_norm / g_norm
                trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)  # (L,)
                torch._foreach_mul_(grads, list(trust.unbind()))
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads, alpha=group["lr"])  # v = m v + lr trust g
            torch._foreach_sub_(params, bufs)  # w -= v


def lr_at(step, peak_lr, warmup_steps, total_steps):
    """Learning rate of optimiser step `step` (0-based): linear warmup from 0 to peak_lr, as the
    official code's (step / warmup_steps x peak), then cosine decay to 0."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------- the loop
def loop(run, net, views, schedule, step, total_steps):
    """One flat loop over the steps, crossing epochs; one save path. net: the model (in DDP under
    torchrun), compiled here with --compile."""
    args = run.args
    stop = StopRequest(run.world)
    step_net = torch.compile(net) if args.compile else net  # after DDP, the order torch supports
    # (loss, contrastive top-1, spread) of each step since the last log line, on the device: read
    # once per line, so that no step waits for the host
    window = []
    epoch_rows = []  # (means of a log line's window, its steps) in this epoch
    bar = tqdm(total=total_steps, initial=step, disable=True if not run.main else None,
               dynamic_ncols=True)
    run.t_start = time.time()  # training time starts now, not at setup
    t_log = run.t_start
    images_since_log = 0
    first_step = step
    last_save = time.monotonic()
    timing = dict(start=time.monotonic(), save_seconds=0.0, window_rates=[])
    stopped_by = None
    try:
        for step, epoch, (x, y) in views.steps(step, total_steps):
            lr = schedule(step)
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            optimizer, scaler, dtype = run.optimizer, run.scaler, run.dtype
            try:
                loss, h, monitors = train_step(step_net, x, optimizer, scaler, dtype, args)
            except Exception as e:  # a compiler that fails on this GPU fails at the first step
                if step_net is net or step > first_step:
                    raise
                why = str(e).splitlines()[0][:200] if str(e) else ""
                tqdm.write(f"warning: --compile failed at the first step ({type(e).__name__}: "
                           f"{why}); training eagerly")
                step_net = net
                loss, h, monitors = train_step(step_net, x, optimizer, scaler, dtype, args)
            if run.probe is not None:  # a linear classifier on the detached h of both views
                run.probe.step(h, torch.cat([y, y]))
            window.append(torch.stack([loss, monitors["contrastive_top1"], monitors["spread"]]))
            step += 1
            images_since_log += args.batch_size
            bar.update()
            end_of_epoch = step % views.steps_per_epoch == 0 or step == total_steps
            stopping = bool(stop) and step < total_steps  # every rank asks, after the same step

            if step % args.log_every == 0 or end_of_epoch:
                # the one host sync per log line
                loss, top1, spread = run.check_finite(window, step).mean(0).tolist()
                epoch_rows.append(((loss, top1, spread), len(window)))
                img_s = images_since_log / (time.time() - t_log)
                timing["window_rates"].append(img_s)
                row = {"step": step, "epoch": epoch, "loss": loss, "contrastive_top1": 100 * top1,
                       "spread": spread, "lr": lr, "img_s": img_s, "time": run.seconds()}
                if run.probe is not None:
                    row["probe_top1"] = run.probe.accuracy(run.world)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.3g}",
                                img_s=f"{row['img_s']:.0f}")
                run.log(row)
                window = []
                t_log = time.time()
                images_since_log = 0

            # at an epoch's end, every --save-every-epochs once --save-every-minutes have passed:
            # a checkpoint costs about a second, which is 10-20% of an epoch of a few seconds
            minutes_passed = time.monotonic() - last_save >= 60 * args.save_every_minutes
            every_epochs = (epoch + 1) % args.save_every_epochs == 0 and minutes_passed
            epoch_due = end_of_epoch and (every_epochs or step == total_steps)
            steps_due = args.save_every and step % args.save_every == 0
            saving = epoch_due or steps_due or stopping
            t_save = time.monotonic()
            if saving:
                run.check_finite(window, step)  # never save a diverged model over a good one
                run.save(step)
                last_save = time.monotonic()
            if epoch_due:
                run.plot()
            timing["save_seconds"] += time.monotonic() - t_save
            if end_of_epoch:
                if run.knn is not None and (epoch + 1) % args.knn_every == 0:
                    run.knn.log(run, step, epoch)
                steps_logged = max(1, sum(k for _, k in epoch_rows))
                loss, top1, spread = [sum(means[i] * k for means, k in epoch_rows) / steps_logged
                                      for i in range(3)]
                saved = f", saved {run.ckpt_path}" if epoch_due else ""
                if run.main:
                    tqdm.write(f"epoch {epoch} done: step {step}/{total_steps}, mean loss "
                               f"{loss:.4f}, contrastive top-1 {100 * top1:.1f}%, spread "
                               f"{spread:.2f}{saved}")
                epoch_rows = []
            # the logged img/s counts training, not checkpoints and monitors
            if saving or end_of_epoch:
                t_log = time.time()
                images_since_log = 0
            if stopping:
                stopped_by = stop.signal
                break
    finally:
        stop.restore()
        bar.close()
    run.summarize(step, step - first_step, timing)
    if not run.main:
        return
    if stopped_by:
        print(f"stopped by {stopped_by} after step {step}; saved {run.ckpt_path}. Resume with the "
              f"same command: python {shlex.join(sys.argv)}", flush=True)
    else:
        print(f"finished {total_steps} steps in {run.seconds():.0f} s; evaluate with: "
              f"python eval_linear.py --ckpt {run.ckpt_path}")


def train_step(net, views, optimizer, scaler, dtype, args):
    """One optimiser step on (2n, 3, S, S) views, view 1 of image i at row i and view 2 at row n + i
    (gradient caching when --micro-batch < n). -> (the loss, h without a graph, the label-free
    monitors of loss.nt_xent), no host sync."""
    n = views.shape[0] // 2
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    optimizer.zero_grad(set_to_none=True)
    # The official objective is loss_a + loss_b, twice this mean over the 2n anchors
    # (google-research/simclr, objective.py): LARS's weight steps see it through g + wd w, and
    # biases and BN take the official step.
    # --micro-batch: the whole batch's gradients with a micro-batch's memory (gradient caching)
    if args.micro_batch and args.micro_batch < n:
        loss, h, monitors = cached_backward(net, views, scaler, dtype, args.temperature,
                                            args.micro_batch, memory_format)
    else:
        # both views in one forward pass, so that BN normalises over the 2n views of the batch
        with autocast(views.device, dtype):
            h, z = net(views.contiguous(memory_format=memory_format))  # (2n, d), (2n, proj_dim)
        # each view must find its partner among the 2n - 1 others (float32 inside nt_xent)
        loss, monitors = nt_xent(z[:n], z[n:], args.temperature, monitors=True)
        scaler.scale(2 * loss).backward()
    scaler.step(optimizer)  # unscales first: LARS sees the true gradients
    scaler.update()
    return loss.detach(), h.detach(), monitors


# ----------------------------------------------------------------------------- monitors with labels
def build_monitors(args, base, model, rank, device):
    """--probe: (online probe, kNN monitor); either is None where the data has no labels."""
    classes = DATASETS[args.dataset]["num_classes"] or int(labels(base).max()) + 1
    probe = OnlineProbe(model.feat_dim, classes, device) if classes > 0 else None
    knn = None
    if rank == 0 and args.knn_every > 0:
        knn = KnnMonitor.from_dataset(args, view(args), device)
    return probe, knn


class OnlineProbe:
    """A linear classifier trained alongside pretraining on the detached features h of the labelled
    images of each batch (label -1: skipped), with its own optimiser: it never touches the encoder's
    gradients."""

    def __init__(self, feat_dim, classes, device):
        self.head = nn.Linear(feat_dim, classes).to(device)
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
        """Top-1 (%) on the training views since the last call, over all ranks (None: no labels)."""
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
    """kNN top-1 of the encoder's features on --knn-samples random train and test images, in eval
    mode (its BN statistics untouched), every --knn-every epochs."""

    def __init__(self, train_images, train_labels, test_images, test_labels, view, device):
        self.train_images = train_images
        self.train_labels = train_labels
        self.test_images = test_images
        self.test_labels = test_labels
        self.view = view
        self.device = device

    @classmethod
    def from_dataset(cls, args, view, device):
        """The monitor's images, or None where the dataset has no labelled train and test splits."""
        try:
            train_set = get_dataset(args.dataset, args.data_dir, "train", download=False)
            test_set = get_dataset(args.dataset, args.data_dir, "test", download=False)
        except DatasetError as e:
            print(f"note: no kNN monitor ({e})")
            return None
        xtr, ytr = uint8_images(train_set, args.image_size)
        xte, yte = uint8_images(test_set, args.image_size)
        g = torch.Generator().manual_seed(args.seed)
        pick_train = torch.randperm(len(ytr), generator=g)[:args.knn_samples[0]]
        pick_test = torch.randperm(len(yte), generator=g)[:args.knn_samples[1]]
        return cls(xtr[pick_train], ytr[pick_train], xte[pick_test], yte[pick_test], view, device)

    def top1(self, encoder, dtype=None):
        encoder.eval()
        train = ev.features(encoder, self.train_images, self.view, self.device, dtype, "kNN train")
        test = ev.features(encoder, self.test_images, self.view, self.device, dtype, "kNN test")
        encoder.train()
        classes = int(max(self.train_labels.max(), self.test_labels.max())) + 1
        scores = ev.knn_predict(train, self.train_labels, test, classes)
        return round((scores.argmax(1) == self.test_labels).float().mean().item() * 100, 2)

    def log(self, run, step, epoch):
        top1 = self.top1(run.model.encoder, run.dtype)
        tqdm.write(f"epoch {epoch}: kNN top-1 {top1:.2f}% "
                   f"({len(self.train_labels)} / {len(self.test_labels)} images)")
        run.log({"step": step, "epoch": epoch, "knn_top1": top1})


# ----------------------------------------------------------------------------- checkpoints and logs
class Run:
    """What a run keeps in OUTPUT_DIR: last.pt (model, optimiser, scaler, probe, step, args, RNG
    states, written atomically), metrics.jsonl and curves.png; and the run's setup that the loop
    needs. Every rank resumes; only rank 0 writes."""

    def __init__(self, args, rank, world, device, dtype, model, optimizer, scaler, steps_per_epoch):
        self.args = args
        self.main = rank == 0
        self.world = world
        self.device = device
        self.dtype = dtype  # autocast's, None for float32
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.steps_per_epoch = steps_per_epoch
        self.probe = None  # OnlineProbe with --probe
        self.knn = None  # KnnMonitor with --probe, on rank 0
        self.seconds_before = 0.0  # training time of the runs this one resumes
        self.t_start = time.time()
        self.resumed_from = None
        self.history = []  # [{"step", "changed": {flag: (old, new)}}] of each --extend
        self.ckpt_path = os.path.join(args.output_dir, "last.pt")
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")

    def resume(self):
        """The step to start from: 0, or that of --resume / OUTPUT_DIR/last.pt (rank 0 decides),
        whose states are loaded. A checkpoint made with other flags is refused, unless --extend
        changes only the run's length."""
        args = self.args
        path = args.resume
        if path is None and os.path.exists(self.ckpt_path):
            path = self.ckpt_path
        ckpt = agree_on_resume(path, self.world)
        if ckpt is None:
            return 0
        load_model_state(self.model, ckpt, path, ev.MODEL_ARGS, vars(args))
        ignore = set(NEUTRAL)
        if min(ckpt.get("world_size", 1), self.world) == 1:
            ignore.add("sync_bn")  # one rank normalises over its whole batch either way
        changed = changed_flags(ckpt["args"], vars(args), ignore)
        if changed and not (args.extend and set(changed) <= EXTENDABLE):
            names = ", ".join(f"--{k.replace('_', '-')} {old} -> {new}"
                              for k, (old, new) in changed.items())
            if args.extend:
                fix = "--extend changes only --epochs/--max-steps"
            else:
                fix = ("rerun with the checkpoint's flags, pass --extend to change "
                       "--epochs/--max-steps on purpose")
            die(f"{path} was made with other flags ({names}): {fix}, or use another --output-dir")
        self.history = ckpt.get("history", [])
        if changed:
            self.history = self.history + [{"step": ckpt["step"], "changed": changed}]
        steps_per_epoch = ckpt.get("steps_per_epoch", self.steps_per_epoch)
        if steps_per_epoch != self.steps_per_epoch:
            die(f"{path} was written with {steps_per_epoch} steps per epoch, this run has "
                f"{self.steps_per_epoch} (other data?): resume on the checkpoint's data, or use "
                "another --output-dir")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.probe is not None and "probe" in ckpt:
            self.probe.load_state_dict(ckpt["probe"])
        set_rng_states(ckpt["rng"])
        step = ckpt["step"]
        self.seconds_before = ckpt.get("train_seconds", 0.0)
        self.resumed_from = path
        if self.main:
            epoch = step // self.steps_per_epoch
            print(f"resumed from {path} at step {step} (epoch {epoch})", flush=True)
            truncate_jsonl(self.metrics_path, step)
        return step

    def seconds(self):
        """Training seconds over every part of the run."""
        return self.seconds_before + time.time() - self.t_start

    def save(self, step):
        if not self.main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "step": step,
                 "epoch": step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                 "world_size": self.world, "args": vars(self.args), "rng": rng_states(),
                 "history": self.history, "train_seconds": self.seconds()}
        if self.probe is not None:
            state["probe"] = self.probe.state_dict()
        save_checkpoint(self.ckpt_path, state)

    def check_finite(self, window, step):
        """The window's (loss, monitors) rows (steps, 3), averaged over the ranks so that all decide
        alike; a loss that is not finite stops the run."""
        rows = torch.stack(window).float() if window else torch.zeros(0, 3)
        if dist.is_initialized() and dist.get_world_size() > 1 and window:
            dist.all_reduce(rows)
            rows /= dist.get_world_size()
        bad = [i for i, x in enumerate(rows[:, 0].tolist()) if not math.isfinite(x)]
        if bad:
            if os.path.exists(self.ckpt_path):
                where = f"the last good checkpoint is {self.ckpt_path}"
            else:
                where = "no checkpoint was written yet"
            first_bad = step - len(window) + bad[0] + 1
            die(f"loss is not finite at step {first_bad} ({where}): lower --lr, "
                "raise --temperature or use --amp bf16/off")
        return rows

    def summarize(self, step, steps, timing):
        """The run's speed, end to end: images trained over the wall time from the first step to the
        last, checkpoints and monitors included, beside the median of the logged windows (which
        leave them out); the share of time saving; peak GPU memory. OUTPUT_DIR/summary.json (of this
        process's steps) and a JSON line."""
        seconds = time.monotonic() - timing["start"]
        rates = sorted(timing["window_rates"])
        summary = {"steps": steps, "seconds": round(seconds, 1),
                   "img_s_end_to_end": round(steps * self.args.batch_size / max(seconds, 1e-9), 1),
                   "img_s_windows_median": round(rates[len(rates) // 2], 1) if rates else None,
                   "save_seconds": round(timing["save_seconds"], 2),
                   "save_share": round(timing["save_seconds"] / max(seconds, 1e-9), 4)}
        if self.device.type == "cuda":
            summary["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20)
        if self.main:
            save_json(os.path.join(self.args.output_dir, "summary.json"), dict(summary, step=step))
            print(json.dumps({"summary": summary}), flush=True)
        return summary

    def log(self, row):
        if self.main:
            append_jsonl(self.metrics_path, row)

    def plot(self):
        if self.main:
            top1 = {"contrastive_top1": "contrastive (positive found)",
                    "probe_top1": "online linear probe (train)", "knn_top1": "kNN (test)"}
            panels = [("NT-Xent loss", {"loss": "loss"}), ("learning rate", {"lr": "lr"}),
                      ("monitors, top-1 (%)", top1), ("spread of z (1: spread, 0: collapsed)",
                                                      {"spread": "std of normalised z x sqrt(d)"})]
            plot_jsonl(self.metrics_path, os.path.join(self.args.output_dir, "curves.png"), panels)


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
