"""SimCLR pretraining (arXiv 2002.05709): two augmented views per image, a ResNet encoder with an MLP head,
the NT-Xent loss, LARS with warmup and cosine decay, in one hand-written AMP loop. The same file runs as
`python train.py` and as `torchrun --nproc_per_node K train.py` (DDP, negatives from every rank)."""
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
from tqdm import tqdm

from augment import BatchAugment, SimCLRTransform, save_preview
from data import DATASETS, DatasetError, TwoViewBatches, get_dataset
from eval_linear import MODEL_ARGS, build_monitors, knn_monitor
from harness import (Parser, StopRequest, agree_on_resume, amp_dtype, append_jsonl, at_least, changed_flags, checked,
                     die, git_sha, ignore_sigint, load_model_state, make_writable_dir, ordered_pair, plot_jsonl,
                     positive_float, positive_int, probability, rng_states, save_checkpoint, seed_all, set_rng_states,
                     setup_distributed, truncate_jsonl)
from loss import cached_backward, nt_xent
from model import ARCHS, SimCLR, convert_global_bn

BASE_LR = {"lars": 0.3, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}  # per 256 images
# flags that cannot change what a run computes: a resumed run may pass others; the rest must match the checkpoint
NEUTRAL = {"workers", "log_every", "save_every", "save_every_epochs", "output_dir", "resume", "extend", "device",
           "data_dir", "download", "compile", "aug_compile", "channels_last", "probe", "knn_every", "knn_samples",
           "preview", "sync_bn"}
EXTENDABLE = {"epochs", "max_steps"}  # what --extend may change
jitter_strength = checked(float, lambda s: 0 <= s <= 2.5, "s must be in [0, 2.5] (hue jitter 0.2 s is at most 0.5)")


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR pretraining", add_help=False)
    on_off = argparse.BooleanOptionalAction  # --flag / --no-flag
    arg = p.add_argument_group("data").add_argument
    arg("--dataset", default="stl10", choices=list(DATASETS), help="(default: %(default)s)")
    arg("--data-dir", help="dataset root, or the image folder (default: ./data; fashion-mnist: Debian's first)")
    arg("--split", help="(default: stl10 train+unlabeled, 105k images; folder: DIR/train or DIR; else train)")
    arg("--image-size", type=positive_int, help="side of the views (default: the dataset's, e.g. 96 for STL-10)")
    arg("--download", action=on_off, default=True, help="torchvision downloads missing datasets (default: %(default)s)")
    arg("--pipeline", default="batched", choices=("batched", "per-image"), help="batched: views made on the device "
        "by BatchAugment; per-image: SimCLRTransform in DataLoader workers (default: %(default)s)")
    arg("--aug-compile", action=on_off, help="torch.compile BatchAugment (default: on the CPU, and with --compile)")
    arg("--workers", type=at_least(0), default=min(8, os.cpu_count() or 1),
        help="data loader processes per rank for --pipeline per-image (default: %(default)s)")

    arg = p.add_argument_group("model").add_argument
    arg("--arch", default="resnet18", choices=ARCHS, help="torchvision ResNet (default: %(default)s)")
    arg("--width", type=positive_float, default=1.0, help="multiplier, the paper's 1x/2x/4x (default: %(default)s)")
    arg("--cifar-stem", action=on_off, help="3x3 stride-1 first conv, no max-pool (default: on for images up to 64 px)")
    arg("--stem-stride", type=int, default=1, choices=(1, 2), help="of the small stem's conv (default: %(default)s)")
    arg("--proj-dim", type=positive_int, default=128, help="output size of the projection head (default: %(default)s)")
    arg("--proj-layers", type=int, default=2, choices=(2, 3),
        help="linear layers of the projection head: 2 is SimCLR's, 3 SimCLRv2's (default: %(default)s)")
    arg("--proj-out-bn", action=on_off, default=True, help="BN (scale, no shift) on the head's output, no bias: the "
        "official code's head; off: the paper's formula, a bias and no BN (default: %(default)s)")
    arg("--sync-bn", action=on_off, help="BN over all ranks' batch, the paper's global BN (default: on when world > 1)")

    arg = p.add_argument_group("augmentation (paper, appendix A)").add_argument
    arg("--jitter-strength", type=jitter_strength, help="colour distortion strength s (default: 1.0; CIFAR 0.5)")
    arg("--jitter-p", type=probability, default=0.8, help="probability of colour jitter (default: %(default)s)")
    arg("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), action=ordered_pair(0, 1),
        help="area range of the random resized crop (default: %(default)s)")
    arg("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), action=ordered_pair(0),
        help="aspect ratio range of the crop (default: %(default)s)")
    arg("--flip-p", type=probability, default=0.5, help="horizontal flip probability (default: %(default)s)")
    arg("--gray-p", type=probability, default=0.2, help="grayscale probability (default: %(default)s)")
    arg("--blur-p", type=probability, help="Gaussian blur probability (default: 0.5; 0 up to 32 px, as on CIFAR)")
    arg("--blur-sigma", type=float, nargs=2, default=(0.1, 2.0), action=ordered_pair(0), help="(default: %(default)s)")
    arg("--rotate-p", type=probability, default=0.0, help="90/180/270 degree rotation (default: %(default)s)")
    arg("--solarize-p", type=probability, default=0.0, help="solarization probability (default: %(default)s)")

    arg = p.add_argument_group("optimization").add_argument
    arg("--batch-size", type=at_least(2), default=512, help="global batch N over all ranks, at least 2: each image "
        "needs others as negatives (default: %(default)s; the paper's best is 4096)")
    arg("--micro-batch", type=positive_int, help="images per forward on each rank: the exact loss and gradients of "
        "the whole batch by gradient caching, with this many images' memory; BN per micro-batch, as DDP without "
        "--sync-bn (default: the rank's batch)")
    arg("--epochs", type=positive_int, default=100, help="(default: %(default)s, the paper's ablations)")
    arg("--max-steps", type=positive_int, help="stop after this many steps, the schedule fitted to them")
    arg("--temperature", type=positive_float, default=0.5,
        help="tau of NT-Xent (default: %(default)s, the official CIFAR-10 recipe; its ImageNet flag is 0.1)")
    arg("--optimizer", default="lars", choices=("lars", "sgd", "adam", "adamw"), help="(default: %(default)s)")
    arg("--lr", type=positive_float, help="base learning rate per 256 images, scaled by batch/256 "
        "(default: lars 0.3 as in the paper, sgd 0.05, adam/adamw 1e-3)")
    arg("--weight-decay", type=at_least(0, float), default=1e-6, help="(default: %(default)s; not on biases and BN)")
    arg("--momentum", type=float, default=0.9, help="LARS/SGD momentum (default: %(default)s)")
    arg("--warmup-epochs", type=at_least(0, float), default=10, help="linear, then cosine decay (default: %(default)s)")
    arg("--amp", default="bf16", choices=("bf16", "fp16", "off"),
        help="autocast dtype (default: %(default)s; fp16 with a GradScaler, CUDA only, where the GPU lacks bf16)")

    arg = p.add_argument_group("run").add_argument
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="(default: %(default)s; under torchrun each rank takes cuda:LOCAL_RANK)")
    arg("--channels-last", action=on_off, default=True, help="NHWC memory format (default: %(default)s)")
    arg("--compile", action="store_true", help="torch.compile the model (default: %(default)s)")
    arg("--seed", type=int, default=0, help="(default: %(default)s)")
    arg("--output-dir", help="(default: runs/DATASET)")
    arg("--resume", help="checkpoint to continue from (default: OUTPUT_DIR/last.pt when it exists)")
    arg("--extend", action="store_true", help="resume with another --epochs/--max-steps on purpose (the schedule is "
        "refitted to the new length); the change and its step go into the checkpoint's history (default: %(default)s)")
    arg("--save-every", type=at_least(0), default=0, help="also save every this many steps (default: %(default)s)")
    arg("--save-every-epochs", type=positive_int, default=1, help="epochs between last.pt and curves.png (the last "
        "epoch and a stop always save); raise it where an epoch takes seconds (default: %(default)s)")
    arg("--log-every", type=at_least(1), default=10, help="steps between log lines (default: %(default)s)")
    arg("--preview", action="store_true", help="write OUTPUT_DIR/augmentations.png and exit (default: %(default)s)")
    arg("--probe", action="store_true", help="monitors with labels: an online linear probe on detached features and a "
        "kNN classifier every --knn-every epochs, into metrics.jsonl and curves.png (default: %(default)s)")
    arg("--knn-every", type=at_least(0), default=1, help="epochs between --probe's kNN monitors (default: %(default)s)")
    arg("--knn-samples", type=positive_int, nargs=2, default=(10000, 5000), metavar=("TRAIN", "TEST"),
        help="labelled train and test images of the kNN monitor (default: %(default)s)")
    return p


def resolve_args(args, world_size=1):
    """Fill the dataset-dependent defaults in place; the flags themselves are checked by their argparse types."""
    info = DATASETS[args.dataset]
    args.split = args.split or info["pretrain_split"]
    args.image_size = info["size"] if args.image_size is None else args.image_size
    args.cifar_stem = args.image_size <= 64 if args.cifar_stem is None else args.cifar_stem
    if args.jitter_strength is None:
        args.jitter_strength = 0.5 if args.dataset.startswith("cifar") else 1.0
    args.lr = BASE_LR[args.optimizer] if args.lr is None else args.lr
    args.output_dir = args.output_dir or os.path.join("runs", args.dataset)
    args.sync_bn = world_size > 1 if args.sync_bn is None else args.sync_bn
    if args.batch_size % world_size:
        die(f"--batch-size {args.batch_size} does not divide over {world_size} ranks: use a multiple of {world_size}")
    per_rank, m = args.batch_size // world_size, args.micro_batch
    if m and per_rank % m:
        fit = max(d for d in range(1, min(m, per_rank) + 1) if per_rank % d == 0)
        die(f"--micro-batch {m} {'is larger than' if m > per_rank else 'does not divide'} the {per_rank} images per "
            f"rank (--batch-size {args.batch_size} / {world_size} ranks): use a divisor of {per_rank}, such as {fit}")
    return args


def main(args):
    # torch.compile of the augmentation on a CPU-only machine warns that CUDA_HOME has no CUDA: noise, not news
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    rank, world, device = setup_distributed(args.device)
    try:
        train(args, rank, world, device)
    except torch.OutOfMemoryError:
        die(f"out of memory on {device} with --batch-size {args.batch_size} ({args.batch_size // world} per rank): "
            f"use {'a smaller ' if args.micro_batch else ''}--micro-batch (the same step with the memory of fewer "
            "images), a smaller --batch-size (the learning rate scales with it), or more GPUs", every_rank=True)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, keeping the last checkpoint
        out = os.path.join(args.output_dir or os.path.join("runs", args.dataset), "last.pt")
        print(f"\ninterrupted; {out} holds the last checkpoint: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device):
    resolve_args(args, world)
    seed_all(args.seed + rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    base = pretraining_data(args, world)
    make_writable_dir(args.output_dir, f"--output-dir {args.output_dir}", "pass a folder you can write to")
    if args.preview:
        if rank == 0:
            print(f"wrote {preview(base, args)}")
        return
    if args.batch_size > len(base):
        die(f"--batch-size {args.batch_size} is larger than the {len(base)} images of {args.dataset} "
            f"{args.split}: with drop_last nothing would train; use at most {len(base)}")
    try:
        views = build_views(base, args, rank, world, device)
    except DatasetError as e:  # e.g. a folder too large to hold in memory
        die(str(e), every_rank=True)

    total_steps = min(args.epochs * views.steps_per_epoch, args.max_steps or math.inf)
    # the schedule spans the run that happens: a run cut by --max-steps gets a proportionally shorter warmup
    warmup_steps = min(total_steps, round(args.warmup_epochs * total_steps / args.epochs))
    peak_lr = args.lr * args.batch_size / 256  # linear scaling rule, on the global batch
    schedule = partial(lr_at, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    model = build_model(args, world, device)
    optimizer = build_optimizer(model, args, peak_lr)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    probe, knn = build_monitors(args, base, model, rank, device)

    run = Run(args, rank == 0, model, optimizer, scaler, probe, views.steps_per_epoch)
    step = run.resume(world)
    if rank == 0:
        print(json.dumps({"args": vars(args), "git": git_sha(), "world_size": world}), flush=True)
        if step == 0:
            preview(base, args)
    if step >= total_steps:
        if rank == 0:
            print(f"{run.resumed_from} has already run {step} of {total_steps} steps: nothing to do")
        return
    net = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if world > 1 else model)
    net = torch.compile(net) if args.compile else net  # after DDP, the order torch supports
    loop(args, run, net, views, schedule, step, total_steps, dtype, knn, world, device)


# ------------------------------------------------------------------------------------------------- data
def pretraining_data(args, world):
    """The pretraining split; under torchrun the first rank of each machine reads it first (it may download)."""
    local_main = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world > 1 and not local_main:
        dist.barrier()
    try:
        base = get_dataset(args.dataset, args.data_dir, args.split, download=args.download and local_main)
    except DatasetError as e:
        die(str(e), every_rank=True)
    if world > 1 and local_main:
        dist.barrier()
    return base


def preview(base, args):
    """OUTPUT_DIR/augmentations.png: eight images and their two views."""
    transform = SimCLRTransform(args.image_size, **augment_kwargs(args))
    return save_preview([base[i][0] for i in range(min(8, len(base)))], transform,
                        os.path.join(args.output_dir, "augmentations.png"), seed=args.seed)


def augment_kwargs(args):
    info = DATASETS[args.dataset]
    return dict(s=args.jitter_strength, crop_scale=args.crop_scale, crop_ratio=args.crop_ratio, flip_p=args.flip_p,
                jitter_p=args.jitter_p, gray_p=args.gray_p, blur_p=args.blur_p, blur_sigma=args.blur_sigma,
                rotate_p=args.rotate_p, solarize_p=args.solarize_p, mean=info["mean"], std=info["std"])


def build_views(base, args, rank, world, device):
    """The rank's two-view batches, from the batched or the per-image pipeline (data.TwoViewBatches)."""
    views = partial(TwoViewBatches, base, args.batch_size // world, rank, world, args.seed, device)
    if args.pipeline == "per-image":
        return views(transform=SimCLRTransform(args.image_size, **augment_kwargs(args)), workers=args.workers,
                     worker_init_fn=ignore_sigint)
    compile_aug = args.aug_compile if args.aug_compile is not None else device.type == "cpu" or args.compile
    aug = BatchAugment(args.image_size, **augment_kwargs(args), compile=compile_aug).to(device)
    return views(batch_augment=aug, image_size=args.image_size)


# ------------------------------------------------------------------------------------------ model and optimiser
def build_model(args, world, device):
    model = SimCLR.from_args(vars(args))
    if world > 1 and args.sync_bn:  # global BN: statistics of the whole batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_global_bn(model)
    return model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)


def build_optimizer(model, args, lr):
    """Biases and BN parameters (ndim <= 1) are excluded from weight decay and from the LARS adaptation."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0, lars=False)]  # lars: LARS's key only
    if args.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    fast = dict(fused=True) if args.device.startswith("cuda") else dict(foreach=True)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, **fast)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, weight_decay=args.weight_decay, **fast)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in the official SimCLR code (lars_optimizer.py): g = grad + wd w, trust ratio
    eta ||w|| / ||g||, classic momentum with the rate inside, v = m v + lr trust g, w -= v. Groups with lars=False
    (biases, BN) get neither weight decay nor the trust ratio. Foreach kernels: one launch per op for all layers."""

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
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0)  # (L,)
                torch._foreach_mul_(grads, list(trust.unbind()))
            for p in (p for p in params if "momentum_buffer" not in self.state[p]):
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads, alpha=group["lr"])  # v = m v + lr trust g
            torch._foreach_sub_(params, bufs)  # w -= v


def lr_at(step, peak_lr, warmup_steps, total_steps):
    """Learning rate of optimiser step `step` (0-based): linear warmup to peak_lr, then cosine decay to 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------- the loop
def loop(args, run, net, views, schedule, step, total_steps, dtype, knn, world, device):
    """One flat loop over the steps, crossing epochs; one save path."""
    stop, window, epoch_losses = StopRequest(world), [], []
    bar = tqdm(total=total_steps, initial=step, disable=True if not run.main else None, dynamic_ncols=True)
    run.t_start = t_log = time.time()  # training time starts now, not at setup
    n_log = 0
    try:
        for step, epoch, (x, y) in views.steps(step, total_steps):
            lr = schedule(step)
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            window.append(train_step(net, x, run.optimizer, run.scaler, dtype, args.temperature, args.channels_last,
                                     run.probe, y, args.micro_batch))
            step, n_log = step + 1, n_log + args.batch_size
            bar.update()
            end_of_epoch = step % views.steps_per_epoch == 0 or step == total_steps
            stopping = bool(stop) and step < total_steps  # every rank asks, after the same step
            if step % args.log_every == 0 or end_of_epoch:
                loss = run.check_finite(window, step).mean().item()
                epoch_losses.append((loss, len(window)))
                row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "img_s": n_log / (time.time() - t_log),
                       "time": run.seconds()}
                if run.probe is not None:
                    row["probe_top1"] = run.probe.accuracy(world)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{row['img_s']:.0f}")
                run.log(row)
                window, t_log, n_log = [], time.time(), 0
            epoch_due = end_of_epoch and ((epoch + 1) % args.save_every_epochs == 0 or step == total_steps)
            saving = epoch_due or (args.save_every and step % args.save_every == 0) or stopping
            if saving:
                run.check_finite(window, step)
                run.save(step)
            if end_of_epoch:
                if knn is not None and (epoch + 1) % args.knn_every == 0:
                    top1 = knn_monitor(run.model.encoder, knn, args, device, dtype)
                    tqdm.write(f"epoch {epoch}: kNN top-1 {top1:.2f}% ({len(knn[1])} / {len(knn[3])} images)")
                    run.log({"step": step, "epoch": epoch, "knn_top1": top1})
                if epoch_due:
                    run.plot()
                mean = sum(v * k for v, k in epoch_losses) / max(1, sum(k for _, k in epoch_losses))
                saved = f", saved {run.ckpt_path}" if epoch_due else ""
                if run.main:
                    tqdm.write(f"epoch {epoch} done: step {step}/{total_steps}, mean loss {mean:.4f}{saved}")
                epoch_losses = []
            if saving or end_of_epoch:  # the logged img/s counts training, not checkpoints and monitors
                t_log, n_log = time.time(), 0
            if stopping:
                if run.main:
                    print(f"stopped by {stop.signal} after step {step}; saved {run.ckpt_path}. Resume with the same "
                          f"command: python {shlex.join(sys.argv)}", flush=True)
                return
    finally:
        stop.restore()
        bar.close()
    if run.main:
        print(f"finished {total_steps} steps in {run.seconds():.0f} s; evaluate with: python eval_linear.py "
              f"--ckpt {run.ckpt_path}")


def train_step(net, views, optimizer, scaler, dtype, temperature, channels_last=True, probe=None, labels=None,
               micro_batch=None):
    """One optimiser step on (2n, 3, S, S) views (gradient caching when micro_batch < n); the loss, no host sync."""
    n, fmt = views.shape[0] // 2, torch.channels_last if channels_last else torch.contiguous_format
    optimizer.zero_grad(set_to_none=True)
    # the official objective is loss_a + loss_b, twice this mean over the 2n anchors (google-research/simclr,
    # objective.py): LARS's weight steps see it through g + wd w, and biases and BN take the official step
    if micro_batch and micro_batch < n:
        loss, h = cached_backward(net, views, scaler, dtype, temperature, micro_batch, fmt)
    else:
        with torch.autocast(views.device.type, dtype=dtype, enabled=dtype is not None):
            h, z = net(views.contiguous(memory_format=fmt))  # (2n, feat_dim), (2n, proj_dim)
        loss = nt_xent(z[:n], z[n:], temperature)
        scaler.scale(2 * loss).backward()
    scaler.step(optimizer)  # unscales first: LARS sees the true gradients
    scaler.update()
    if probe is not None:
        probe.step(h.detach(), torch.cat([labels, labels]))
    return loss.detach()


# ------------------------------------------------------------------------------------------ checkpoints and logs
class Run:
    """What a run keeps in OUTPUT_DIR: last.pt (model, optimiser, scaler, probe, step, args, RNG states, written
    atomically), metrics.jsonl and curves.png. Every rank resumes; only rank 0 writes."""

    def __init__(self, args, main, model, optimizer, scaler, probe, steps_per_epoch):
        self.args, self.main, self.model, self.optimizer, self.scaler = args, main, model, optimizer, scaler
        self.probe, self.steps_per_epoch, self.seconds_before, self.t_start = probe, steps_per_epoch, 0.0, time.time()
        self.resumed_from, self.history = None, []  # history: [{"step", "changed": {flag: (old, new)}}] of --extend
        self.ckpt_path, self.metrics_path = (os.path.join(args.output_dir, f) for f in ("last.pt", "metrics.jsonl"))

    def resume(self, world):
        """The step to start from: 0, or that of --resume / OUTPUT_DIR/last.pt (rank 0 decides), whose states are
        loaded. A checkpoint made with other flags is refused, unless --extend changes only the run's length."""
        args, path = self.args, self.args.resume or (self.ckpt_path if os.path.exists(self.ckpt_path) else None)
        if (ckpt := agree_on_resume(path, world)) is None:
            return 0
        load_model_state(self.model, ckpt, path, MODEL_ARGS, vars(args))
        changed = changed_flags(ckpt["args"], vars(args), NEUTRAL)
        if changed and not (args.extend and set(changed) <= EXTENDABLE):
            names = ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changed.items())
            fix = ("--extend changes only --epochs/--max-steps" if args.extend else "rerun with the checkpoint's "
                   "flags, pass --extend to change --epochs/--max-steps on purpose")
            die(f"{path} was made with other flags ({names}): {fix}, or use another --output-dir")
        self.history = ckpt.get("history", []) + ([{"step": ckpt["step"], "changed": changed}] if changed else [])
        if (spe := ckpt.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            die(f"{path} was written with {spe} steps per epoch, this run has {self.steps_per_epoch} (other data?): "
                "resume on the checkpoint's data, or use another --output-dir")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.probe is not None and "probe" in ckpt:
            self.probe.load_state_dict(ckpt["probe"])
        set_rng_states(ckpt["rng"])
        step, self.seconds_before, self.resumed_from = ckpt["step"], ckpt.get("train_seconds", 0.0), path
        if self.main:
            print(f"resumed from {path} at step {step} (epoch {step // self.steps_per_epoch})", flush=True)
            truncate_jsonl(self.metrics_path, step)
        return step

    def seconds(self):
        """Training seconds over every part of the run."""
        return self.seconds_before + time.time() - self.t_start

    def save(self, step):
        if self.main:
            save_checkpoint(self.ckpt_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": step // self.steps_per_epoch, "step": step,
                "steps_per_epoch": self.steps_per_epoch, "args": vars(self.args), "rng": rng_states(),
                **({"probe": self.probe.state_dict()} if self.probe is not None else {}),
                "history": self.history, "train_seconds": self.seconds()})

    def check_finite(self, window, step):
        """The window's losses, averaged over the ranks so that all decide alike; one not finite stops the run."""
        losses = torch.stack(window).float() if window else torch.zeros(0)
        if dist.is_initialized() and dist.get_world_size() > 1 and window:
            dist.all_reduce(losses)
            losses /= dist.get_world_size()
        if bad := [i for i, x in enumerate(losses.tolist()) if not math.isfinite(x)]:
            where = (f"the last good checkpoint is {self.ckpt_path}" if os.path.exists(self.ckpt_path)
                     else "no checkpoint was written yet")
            die(f"loss is not finite at step {step - len(window) + bad[0] + 1} ({where}): lower --lr, "
                "raise --temperature or use --amp bf16/off")
        return losses

    def log(self, row):
        if self.main:
            append_jsonl(self.metrics_path, row)

    def plot(self):
        if self.main:
            plot_jsonl(self.metrics_path, os.path.join(self.args.output_dir, "curves.png"), [
                ("NT-Xent loss", {"loss": "loss"}), ("learning rate", {"lr": "lr"}),
                ("monitors, top-1 (%)", {"probe_top1": "online linear probe (train)", "knn_top1": "kNN (test)"})])


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
