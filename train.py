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
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import evaluation as ev
from augment import BatchAugment, ImageSpec, Recipe, SimCLRTransform, save_preview
from data import DATASETS, DatasetError, TooLargeToHold, TwoViewBatches, get_dataset, labels
from harness import (Parser, Run, add_device_flags, amp_dtype, at_least, autocast, checked, die,
                     git_sha, ignore_sigint, make_writable_dir, ordered_pair, positive_float,
                     positive_int, probability, seed_all, setup_distributed)
from lars import LARS
from loss import cached_backward, multi_crop_nt_xent, nt_xent
from model import ARCHS, INITS, SimCLR, convert_global_bn, small_stem

# Flags that cannot change what a run computes: a resumed run may pass other values. Every other
# flag must match the checkpoint's, but --sync-bn where one of the two runs had a single rank (it
# changes nothing there).
NEUTRAL = {"workers", "log_every", "save_every", "save_every_epochs", "save_every_minutes",
           "output_dir", "resume", "extend", "device", "data_dir", "download", "compile",
           "aug_compile", "channels_last", "probe", "knn_every", "knn_samples", "preview"}
EXTENDABLE = {"epochs", "max_steps"}  # what --extend may change
# curves.png: a panel per (title, {metrics.jsonl key: label})
PANELS = [("NT-Xent loss", {"loss": "loss"}), ("learning rate", {"lr": "lr"}),
          ("monitors, top-1 (%)", {"contrastive_top1": "contrastive (positive found)",
                                   "probe_top1": "online linear probe (train)",
                                   "knn_top1": "kNN (test)"}),
          ("spread of z (1: spread, 0: collapsed)", {"spread": "std of normalised z x sqrt(d)"})]
jitter_strength = checked(float, lambda s: 0 <= s <= 2.5,
                          "s must be in [0, 2.5] (hue jitter 0.2 s is at most 0.5)")


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR pretraining", add_help=False)
    on_off = argparse.BooleanOptionalAction  # --flag / --no-flag

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="stl10", choices=list(DATASETS))
    g.add_argument("--data-dir",
                   help="dataset root, or the image folder (default: ./data; fashion-mnist: "
                        "Debian's folder first)")
    g.add_argument("--split",
                   help="(default: stl10 train+unlabeled, 105k images; folder: DIR/train or DIR; "
                        "else train)")
    g.add_argument("--image-size", type=positive_int,
                   help="side of the views (default: the dataset's, e.g. 96 for STL-10)")
    g.add_argument("--download", action=on_off, default=True,
                   help="torchvision downloads missing datasets")
    g.add_argument("--pipeline", default="batched", choices=("batched", "per-image"),
                   help="batched: views made on the device by BatchAugment; per-image: "
                        "SimCLRTransform in DataLoader workers")
    g.add_argument("--aug-compile", action=on_off,
                   help="torch.compile BatchAugment (default: on the CPU, and with --compile)")
    g.add_argument("--workers", type=at_least(0), default=min(8, os.cpu_count() or 1),
                   help="data loader processes per rank for --pipeline per-image")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=ARCHS, help="torchvision ResNet")
    g.add_argument("--width", type=positive_float, default=1.0,
                   help="multiplier, the paper's 1x/2x/4x")
    g.add_argument("--cifar-stem", action=on_off,
                   help="3x3 first conv, no max-pool (default: on for images up to 64 px)")
    g.add_argument("--stem-stride", type=int, default=1, choices=(1, 2),
                   help="of the small stem's conv")
    g.add_argument("--proj-dim", type=positive_int, default=128,
                   help="output size of the projection head")
    g.add_argument("--proj-layers", type=int, default=2, choices=(2, 3),
                   help="linear layers of the projection head: 2 is SimCLR's, 3 SimCLRv2's")
    g.add_argument("--init", default="official", choices=INITS,
                   help="the weights' initialisation; official: google-research/simclr's (convs "
                        "TF's variance scaling, fan-in, truncated normal; the head's dense layers "
                        "N(0, 0.01)); torchvision: kaiming fan-out and PyTorch's default")
    g.add_argument("--sync-bn", action=on_off,
                   help="BN over the batch of all ranks, the paper's global BN (default: on with "
                        "several ranks)")

    g = p.add_argument_group("augmentation (paper, appendix A)")
    g.add_argument("--jitter-strength", type=jitter_strength,
                   help="colour distortion strength s (default: 1.0; CIFAR 0.5)")
    g.add_argument("--jitter-p", type=probability, default=0.8, help="probability of colour jitter")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0),
                   action=ordered_pair(0, 1), help="area range of the random resized crop")
    g.add_argument("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3),
                   action=ordered_pair(0), help="aspect ratio range of the crop")
    g.add_argument("--flip-p", type=probability, default=0.5, help="horizontal flip probability")
    g.add_argument("--gray-p", type=probability, default=0.2, help="grayscale probability")
    g.add_argument("--blur-p", type=probability,
                   help="Gaussian blur probability (default: 0.5; 0 up to 32 px, as on CIFAR)")
    g.add_argument("--blur-sigma", type=float, nargs=2, default=(0.1, 2.0), action=ordered_pair(0))
    g.add_argument("--rotate-p", type=probability, default=0.0,
                   help="probability of a 90, 180 or 270 degree rotation (the paper's optional "
                        "'rotate', Figure 5)")

    g = p.add_argument_group("multi-crop (SwAV, arXiv 2006.09882, section 3.2)")
    g.add_argument("--small-crops", type=at_least(0), default=0,
                   help="V small crops per image beside the two views, every crop of an image a "
                        "positive of every other (loss.multi_crop_nt_xent); 0 is SimCLR")
    g.add_argument("--small-size", type=positive_int,
                   help="side of the small crops (default: 96/224 of --image-size, SwAV's 96 px "
                        "beside 224)")
    g.add_argument("--small-crop-scale", type=float, nargs=2, default=(0.05, 0.14),
                   action=ordered_pair(0, 1),
                   help="area range of the small crops (SwAV's; it pairs them with "
                        "--crop-scale 0.14 1 for the two large views)")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=at_least(2), default=512,
                   help="global batch N over all ranks, at least 2: each image needs others as "
                        "negatives; the paper's best is 4096")
    g.add_argument("--micro-batch", type=positive_int,
                   help="images per forward on each rank: the loss and gradients of the whole "
                        "batch by gradient caching, with this many images' memory; BN normalises "
                        "each micro-batch, as DDP without --sync-bn (default: the rank's batch)")
    g.add_argument("--epochs", type=positive_int, default=100, help="the paper's ablations run 100")
    g.add_argument("--max-steps", type=positive_int,
                   help="stop after this many steps, the schedule fitted to them")
    g.add_argument("--temperature", type=positive_float, default=0.5,
                   help="tau of NT-Xent: the official CIFAR-10 recipe's; its ImageNet flag is 0.1")
    g.add_argument("--lr", type=positive_float, default=0.3,
                   help="LARS base learning rate per 256 images, scaled by batch / 256 (the "
                        "paper's 0.3)")
    g.add_argument("--weight-decay", type=at_least(0, float), default=1e-6,
                   help="not on biases and BN")
    g.add_argument("--momentum", type=float, default=0.9, help="LARS momentum")
    g.add_argument("--warmup-epochs", type=at_least(0, float), default=10,
                   help="linear, then cosine decay")

    g = p.add_argument_group("run")
    add_device_flags(g)
    g.add_argument("--channels-last", action=on_off, default=True, help="NHWC memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-dir", help="(default: runs/DATASET)")
    g.add_argument("--resume",
                   help="checkpoint to continue from (default: OUTPUT_DIR/last.pt when it exists)")
    g.add_argument("--extend", action="store_true",
                   help="resume with another --epochs/--max-steps on purpose (the schedule is "
                        "refitted to the new length); the change and its step go into the "
                        "checkpoint's history")
    g.add_argument("--save-every", type=at_least(0), default=0,
                   help="also save every this many steps")
    g.add_argument("--save-every-epochs", type=positive_int, default=1,
                   help="epochs between last.pt and curves.png, once --save-every-minutes have "
                        "passed too (the last epoch and a stop always save)")
    g.add_argument("--save-every-minutes", type=at_least(0, float), default=1.0,
                   help="minutes of training at least between saves at an epoch's end: where an "
                        "epoch takes seconds (a fast GPU), saving each one would cost 10-20%% of "
                        "the time; 0 saves at every --save-every-epochs")
    g.add_argument("--log-every", type=at_least(1), default=10, help="steps between log lines")
    g.add_argument("--preview", action="store_true",
                   help="write OUTPUT_DIR/augmentations.png and exit")
    g.add_argument("--probe", action="store_true",
                   help="monitors with labels: an online linear probe on detached features and a "
                        "kNN classifier every --knn-every epochs, into metrics.jsonl and "
                        "curves.png")
    g.add_argument("--knn-every", type=at_least(0), default=1,
                   help="epochs between --probe's kNN monitors")
    g.add_argument("--knn-samples", type=positive_int, nargs=2, default=(10000, 5000),
                   metavar=("TRAIN", "TEST"),
                   help="labelled train and test images of the kNN monitor")
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
    if args.small_size is None:
        args.small_size = max(1, round(args.image_size * 96 / 224))
    if args.small_crops and args.small_size > args.image_size:
        die(f"--small-size {args.small_size} is larger than the views' {args.image_size} px: "
            "small crops are the smaller ones; use at most --image-size")
    if args.small_crops and args.micro_batch:
        die("--micro-batch does not take --small-crops: use one of the two (a smaller "
            "--batch-size for the memory)")
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
    batches = two_view_batches(base, args, rank, world, device)

    # the schedule is a pure function of the step, so a resumed run takes the same rates; it spans
    # the run that happens: a run cut by --max-steps gets a proportionally shorter warmup
    total_steps = min(args.epochs * batches.steps_per_epoch, args.max_steps or math.inf)
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
    probe = None
    if args.probe:  # monitors with labels: the online probe and the kNN monitor
        classes = DATASETS[args.dataset]["num_classes"] or int(labels(base).max()) + 1
        probe = ev.OnlineProbe(model.feat_dim, classes, device) if classes > 0 else None
    state = dict(model=model, optimizer=optimizer, scaler=scaler, probe=probe)
    run = Run(args, rank, world, device, state, batches.steps_per_epoch, total_steps, PANELS)
    if probe is not None:
        run.log_extras.append(lambda: {"probe_top1": probe.accuracy(world)})
    if args.probe and rank == 0 and args.knn_every > 0:
        knn = ev.KnnMonitor.from_dataset(args.dataset, args.data_dir, image_spec(args),
                                         args.knn_samples, args.seed, device)
        if knn is not None:
            run.epoch_end.append(partial(knn.log, run, model.encoder, dtype, args.knn_every))

    # a rerun of the same command continues where the last checkpoint stopped
    step = run.resume(NEUTRAL, EXTENDABLE, ev.MODEL_ARGS, neutral_on_one_rank={"sync_bn"})
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
    loop(run, net, batches, probe, schedule, step)



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


def image_spec(args):
    """The images the network is fed: side and normalisation."""
    info = DATASETS[args.dataset]
    return ImageSpec(args.image_size, info["mean"], info["std"])


def recipe(args):
    """The augmentation's distributions from the flags (augment.Recipe)."""
    return Recipe(s=args.jitter_strength, crop_scale=args.crop_scale, crop_ratio=args.crop_ratio,
                  flip_p=args.flip_p, jitter_p=args.jitter_p, gray_p=args.gray_p,
                  blur_p=args.blur_p, blur_sigma=args.blur_sigma, rotate_p=args.rotate_p)


def preview(base, args):
    """OUTPUT_DIR/augmentations.png: eight images and their two views, at most 512 px a side: crops
    and the blur (10% of the side) are relative to the image, so larger views would look the same at
    many times the cost (4096 px views: a 12k x 33k px picture)."""
    images = [base[i][0] for i in range(min(8, len(base)))]
    path = os.path.join(args.output_dir, "augmentations.png")
    spec = image_spec(args)
    if spec.size > 512:
        spec = ImageSpec(512, spec.mean, spec.std)
    return save_preview(images, SimCLRTransform(spec, recipe(args)), path, seed=args.seed)


def small_crops(args):
    """Multi-crop's small crops: their side and normalisation, and the recipe with their scale."""
    spec = ImageSpec(args.small_size, image_spec(args).mean, image_spec(args).std)
    return spec, replace(recipe(args), crop_scale=args.small_crop_scale)


def two_view_batches(base, args, rank, world, device):
    """The rank's two-view batches (with --small-crops, [views, small crops]), batched or per image
    (data.TwoViewBatches)."""
    per_rank = args.batch_size // world
    small_spec, small_recipe = small_crops(args)
    if args.pipeline == "per-image":
        transform = SimCLRTransform(image_spec(args), recipe(args))
        small = SimCLRTransform(small_spec, small_recipe, views=args.small_crops)
        return TwoViewBatches(base, per_rank, rank, world, args.seed, device, transform=transform,
                              workers=args.workers, worker_init_fn=ignore_sigint,
                              small_crops=args.small_crops, small_transform=small)
    compile_aug = args.aug_compile
    # the CPU's elementwise kernels gain 10x; a GPU gains with the model's compile
    if compile_aug is None:
        compile_aug = device.type == "cpu" or args.compile
    aug = BatchAugment(image_spec(args), recipe(args), compile=compile_aug).to(device)
    small = None
    if args.small_crops:
        small = BatchAugment(small_spec, small_recipe, compile=compile_aug).to(device)
    try:
        return TwoViewBatches(base, per_rank, rank, world, args.seed, device, batch_augment=aug,
                              image_size=args.image_size, small_crops=args.small_crops,
                              small_augment=small)
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
    """LARS on every parameter: it leaves biases and BN (1-D) out of weight decay and the trust
    ratio itself."""
    return LARS(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)


def lr_at(step, peak_lr, warmup_steps, total_steps):
    """Learning rate of optimiser step `step` (0-based): linear warmup from 0 to peak_lr, as the
    official code's (step / warmup_steps x peak), then cosine decay to 0."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------- the loop
def loop(run, net, batches, probe, schedule, step):
    """One flat loop over the steps, crossing epochs; run (harness.Run) keeps the books: the log
    line, the saves, the stop signals. net: the model (in DDP under torchrun)."""
    args = run.args
    optimizer = run.state["optimizer"]
    scaler = run.state["scaler"]
    dtype = amp_dtype(args.amp, run.device)
    step_net = torch.compile(net) if args.compile else net  # after DDP, the order torch supports
    run.start(step)
    for step, epoch, (x, y) in batches.steps(step, run.total_steps):
        lr = schedule(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        try:
            loss, h, monitors = train_step(step_net, x, optimizer, scaler, dtype, args)
        except Exception as e:  # a compiler that fails on this GPU fails at the first step
            if step_net is net or step > run.first_step:
                raise
            step_net = net
            tqdm.write(f"warning: --compile failed at the first step ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''}); training eagerly")
            loss, h, monitors = train_step(step_net, x, optimizer, scaler, dtype, args)
        if probe is not None:  # a linear classifier on the detached h of both views
            probe.step(h, torch.cat([y, y]))
        values = {"loss": loss, "contrastive_top1": 100 * monitors["contrastive_top1"],
                  "spread": monitors["spread"]}
        if run.after_step(step + 1, epoch, lr, values):  # log, save, a stop signal
            break
    run.end(step + 1)
    if not run.main:
        return
    if run.stopped_by:
        print(f"stopped by {run.stopped_by} after step {step + 1}; saved {run.ckpt_path}. Resume "
              f"with the same command: python {shlex.join(sys.argv)}", flush=True)
    else:
        print(f"finished {run.total_steps} steps in {run.seconds():.0f} s; evaluate with: "
              f"python eval_linear.py --ckpt {run.ckpt_path}")


def train_step(net, views, optimizer, scaler, dtype, args):
    """One optimiser step on (2n, 3, S, S) views, view 1 of image i at row i and view 2 at row n + i
    (gradient caching when --micro-batch < n); with --small-crops on the list [views, small crops
    (V n, 3, s, s)]. -> (the loss, h of the views without a graph, the label-free monitors of
    loss.nt_xent), no host sync."""
    if isinstance(views, list):
        return multi_crop_step(net, views, optimizer, scaler, dtype, args)
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



def multi_crop_step(net, crops, optimizer, scaler, dtype, args):
    """train_step with small crops: [views (2n, 3, S, S), small (V n, 3, s, s)] in one forward
    (the encoder takes each resolution as its own batch, model.SimCLR.forward), the loss over the
    2 + V crops of each image (loss.multi_crop_nt_xent), backpropagated x 2 as the two-view loss."""
    views, small = crops
    n = views.shape[0] // 2
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    optimizer.zero_grad(set_to_none=True)
    with autocast(views.device, dtype):
        parts = [c.contiguous(memory_format=memory_format) for c in crops]
        h, z = net(parts)  # (2n + V n, d), (2n + V n, proj_dim), crop-major
    loss, monitors = multi_crop_nt_xent(z, 2 + args.small_crops, args.temperature, monitors=True)
    scaler.scale(2 * loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), h[:2 * n].detach(), monitors


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
