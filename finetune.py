"""Fine-tuning SimCLR encoders with labels (arXiv 2002.05709, appendix B.5) against the same network
from random weights, the paper's ablation; and SimCLRv2's steps (arXiv 2006.10029): fine-tuning from
inside the projection head, then distillation into a student on unlabelled images."""
import argparse
import copy
import math
import os
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import evaluation as ev
from augment import BatchAugment, Recipe
from harness import (Parser, amp_dtype, at_least, atomic_write, autocast, check_device, die,
                     figure, make_writable_dir, ordered_pair, positive_float, positive_int,
                     probability, save_figure)
from model import param_groups


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR fine-tuning", add_help=False)
    ev.add_common_flags(p)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", nargs="+", type=positive_int, default=[10],
                   help="one value, or one per --label-fraction (SimCLRv2: 60 at 1%%, 30 at 10%%)")
    g.add_argument("--lr", nargs="+", type=positive_float, default=[0.05],
                   help="Nesterov SGD base rate per 256 images, cosine decay; several values are "
                        "each run and reported, to choose one on --eval-on val")
    g.add_argument("--lr-random", nargs="+", type=positive_float,
                   help="the same for the random-init network, which gets its own rate (default: "
                        "--lr)")
    g.add_argument("--head-layers", nargs="+", type=at_least(0), default=[0],
                   help="fine-tune from inside the projection head: keep its first K layers "
                        "(linear, BN, ReLU) under the classifier; SimCLRv2 keeps 1 of its 3; 0: "
                        "from the encoder; several values are each run; the random-init network "
                        "uses 0")
    g.add_argument("--weight-decay", type=at_least(0, float), default=0.0,
                   help="the paper's fine-tuning has none (appendix B.5)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0),
                   action=ordered_pair(0, 1),
                   help="area range of the crop (the inception crop of the paper's fine-tuning); "
                        "flips too, no colour")
    g.add_argument("--batch-size", type=positive_int, default=256)
    g.add_argument("--save-finetuned", action="store_true",
                   help="write each fine-tuned and distilled network to OUTPUT_DIR")

    g = p.add_argument_group("distillation (SimCLRv2's third step)")
    g.add_argument("--distill", action="store_true",
                   help="then train a student of the same architecture on every training image "
                        "without labels from the fine-tuned network's predictions; the teacher is "
                        "the network fine-tuned at the first --lr from the deepest --head-layers")
    g.add_argument("--distill-epochs", type=positive_int, default=2)
    g.add_argument("--distill-tau", type=positive_float, default=1.0,
                   help="temperature of the teacher's and the student's softmax (SimCLRv2's 1)")
    g.add_argument("--distill-alpha", type=probability, default=1.0,
                   help="weight of the distillation loss; 1 - alpha weighs the labelled loss on "
                        "the labelled images (1: no labels, as SimCLRv2's ImageNet students)")
    return p


def main(args):
    t0 = time.time()
    torch.manual_seed(args.seed)
    device = check_device(args.device)
    amp_dtype(args.amp, device)  # before any work: fp16 on the CPU is refused
    fractions = args.label_fraction
    if len(args.epochs) not in (1, len(fractions)):
        die(f"--epochs takes one value or one per --label-fraction ({len(fractions)}), "
            f"got {len(args.epochs)}")
    if len(args.epochs) == 1:
        args.epochs = args.epochs * len(fractions)
    if not args.ckpt:
        die("nothing to fine-tune: pass --ckpt PATH (a last.pt of train.py)")
    encoders = ev.load_encoders(args)
    deepest = max(args.head_layers)
    for enc in encoders:
        layers = enc.model.projector.layers
        if deepest >= layers:
            die(f"--head-layers {deepest}: {enc.path} has a projection head of {layers} "
                f"layers, so fine-tuning can keep 0 to {layers - 1} of them (train with "
                "--proj-layers 3 for SimCLRv2's head)")
    out = ev.output_dir(args)
    # check that the results folder is writable now, not after the work
    make_writable_dir(out, f"the results folder {out}", "pass --output-dir DIR")
    first = encoders[0].train_args
    data = ev.load_data(args, first, device)
    rows = []
    for enc in encoders:  # the random network starts as pretraining does: training from scratch
        model = enc.model.to(device, memory_format=torch.channels_last)
        rows += finetune_protocol(enc.name, model, enc.train_args, data, args, device, out)
    plot = plot_ablation(rows, out, data)
    return ev.report(out, data, args, rows, "finetune", t0, first, plots=[plot])


def finetune_protocol(name, model, train_args, data, args, device, out):
    """Fine-tune at every --label-fraction, head depth and rate (the random-init network: its own
    rates, from the encoder); then with --distill a student, the teacher being the network
    fine-tuned at the first rate from the deepest --head-layers."""
    scratch = name == "random"
    lrs = args.lr_random if scratch and args.lr_random else args.lr
    depths = [0] if scratch else args.head_layers
    rows = []
    for fraction, epochs in zip(args.label_fraction, args.epochs):
        labelled = ev.balanced_subset(data.train_labels, fraction, args.seed)
        teacher = None
        for k in depths:
            for lr in lrs:
                t1 = time.time()
                curve, logits, net = finetune(model, k, labelled, data, args, device, epochs, lr)
                rows.append(result_row(name, "finetune", fraction, curve, logits, data, t1, lr=lr,
                                       head_layers=k, train_samples=len(labelled)))
                tag = f"{name}_{fraction:g}_head{k}_lr{lr:g}"
                save_network(net, out, f"finetuned_{tag}", train_args, k, args)
                if k == depths[-1] and lr == lrs[0]:
                    teacher = (net, k, lr, rows[-1]["top1"])
        if args.distill and not scratch:
            net, k, lr, teacher_top1 = teacher
            t1 = time.time()
            student = supervised_net(model, k, data.classes)  # from the pretrained weights
            curve, logits = distill(net, student, labelled, data, args, device, lr)
            rows.append(result_row(name, "distill", fraction, curve, logits, data, t1, lr=lr,
                                   head_layers=k, teacher_top1=teacher_top1,
                                   train_samples=len(data.train_labels), labelled=len(labelled),
                                   tau=args.distill_tau, alpha=args.distill_alpha))
            tag = f"{name}_{fraction:g}_head{k}_lr{lr:g}"
            save_network(student, out, f"distilled_{tag}", train_args, k, args)
    return rows


def finetune(model, head_layers, labelled, data, args, device, epochs, lr):
    """Fine-tune a copy of the encoder and of the head's first `head_layers` layers under a new
    linear classifier, on the training images `labelled` (indices) and their labels.
    -> ({epoch: top-1}, logits of the evaluation images, the fine-tuned network)"""
    net = supervised_net(model, head_layers, data.classes)
    labels = data.train_labels[labelled].to(device)

    def loss_fn(logits, idx, x):
        return F.cross_entropy(logits, labels[idx])
    images = data.train_images[labelled]
    curve, logits = train_net(net, images, loss_fn, data, args, device, epochs, lr)
    return curve, logits, net


def supervised_net(model, head_layers, classes):
    """A copy of the encoder and of the head's first `head_layers` layers, under a new linear
    classifier: the network that fine-tuning and distillation train (SimCLRv2 keeps one layer of its
    head; 0 keeps none). The classifier starts at zero, as in every fine-tuning command of the
    official code (zero_init_logits_layer=True)."""
    head = model.projector.first_layers(head_layers)
    classifier = nn.Linear(model.projector.dims[head_layers], classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    return nn.Sequential(OrderedDict(encoder=copy.deepcopy(model.encoder), head=copy.deepcopy(head),
                                     classifier=classifier))


def result_row(name, protocol, fraction, curve, logits, data, t1, **extra):
    """A result: the top-1 after the last epoch, its top-5, the curve of top-1 along training."""
    return dict(encoder=name, protocol=protocol, label_fraction=fraction, split=data.split, **extra,
                top1=curve[max(curve)], top5=ev.topk(logits, data.eval_labels, 5),
                curve=list(curve.values()), curve_epochs=list(curve),
                seconds=round(time.time() - t1, 1))


# ----------------------------------------------------------------------------------------- training
def train_net(net, images, loss_fn, data, args, device, epochs, lr):
    """Nesterov SGD with cosine decay over uint8 `images` (random crop and flip, the paper's
    appendix B.5 without its LARS; weight decay on weights only); loss_fn(logits, idx, x) is the
    loss of the images images[idx], seen as the views x. Top-1 on the evaluation images after about
    ten evenly spaced epochs and the last. -> ({epoch: top-1}, logits of the evaluation images)"""
    net = net.to(device, memory_format=torch.channels_last)
    batch = min(args.batch_size, len(images))
    steps = max(1, len(images) // batch)
    opt = torch.optim.SGD(param_groups(net, args.weight_decay), lr=lr * batch / 256, momentum=0.9,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    # crop and flip
    recipe = Recipe(crop_scale=args.crop_scale, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    aug = BatchAugment(data.spec, recipe).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    every = math.ceil(epochs / 10)
    curve = {}
    bar = tqdm(range(epochs), desc=f"{epochs} epochs at {lr:g}", leave=False, dynamic_ncols=True,
               disable=None)
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(images), generator=gen)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            # the augmented views (B, 3, S, S)
            x = aug(images[idx].to(device), gen, views=1)
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                loss = loss_fn(net(x), idx, x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            logits = ev.predict(net, data.eval_images, data.spec, device, dtype)
            curve[epoch + 1] = ev.topk(logits, data.eval_labels, 1)
    return curve, logits


def distill_loss(student_logits, teacher_logits, tau=1.0):
    """SimCLRv2's distillation loss (arXiv 2006.10029, eq. 2): cross-entropy of the student's
    softmax(./tau) to the teacher's softmax(./tau), times tau^2 as in the colab of the official
    repository (distillation_self_training.ipynb); mean over the batch, in float32."""
    p_teacher = F.softmax(teacher_logits.float() / tau, dim=1)  # (B, classes)
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=1)  # (B, classes)
    return -(p_teacher * log_p_student).sum(1).mean() * tau ** 2


def distill(teacher, student, labelled, data, args, device, lr):
    """Train `student` on every training image to match the frozen teacher's softened predictions on
    the same view (no labels), plus with --distill-alpha < 1 the labelled loss of the images
    `labelled`: their labels are the only ones read.
    -> ({epoch: top-1}, logits of the evaluation images)"""
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()
    known = torch.full((len(data.train_images),), -1, dtype=torch.long)  # -1: no label, ignored
    known[labelled] = data.train_labels[labelled]
    known = known.to(device)
    alpha = args.distill_alpha
    dtype = amp_dtype(args.amp, device)

    def loss_fn(logits, idx, x):
        with torch.no_grad(), autocast(device, dtype):
            target = teacher(x)  # (B, classes)
        loss = alpha * distill_loss(logits, target, args.distill_tau)
        y = known[idx.to(device)]
        if alpha < 1 and (y >= 0).any():
            loss = loss + (1 - alpha) * F.cross_entropy(logits.float(), y, ignore_index=-1)
        return loss
    epochs = args.distill_epochs
    return train_net(student, data.train_images, loss_fn, data, args, device, epochs, lr)


# ------------------------------------------------------------------------------------------ outputs
def save_network(net, out, stem, train_args, head_layers, args):
    """With --save-finetuned: OUT/STEM.pt, the network (encoder, head layers, classifier)."""
    if args.save_finetuned:
        state = {k: v.cpu() for k, v in net.state_dict().items()}
        saved = {"model": state, "head_layers": head_layers, "args": train_args}
        atomic_write(os.path.join(out, stem + ".pt"), lambda f: torch.save(saved, f))


def plot_ablation(rows, out, data):
    """ablation_DATASET.png: top-1 along fine-tuning, per encoder and label fraction."""
    curves = [r for r in rows if r.get("curve")]
    if not curves:
        return None
    fractions = sorted({r["label_fraction"] for r in curves})
    fig, axes = figure(len(fractions), height=3.8)
    for ax, fraction in zip(axes, fractions):
        for r in (r for r in curves if r["label_fraction"] == fraction):
            label = ev.result_name(r, rows, init=True)
            ax.plot(r["curve_epochs"], r["curve"], marker="o", label=label)
        ax.set(xlabel="fine-tuning epoch", ylabel=f"{data.split} top-1 (%)",
               title=f"{data.dataset}: fine-tuning on {fraction:.0%} of the labels")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, os.path.join(out, f"ablation_{data.dataset}{data.suffix}.png"))


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
