"""Throughput of the SimCLR pipeline (arXiv 2002.05709): two-view augmentation batched vs per image, the NT-Xent
loss, the model step on ready views and the full training step. Prints a table and writes bench.json.

    python bench.py                      # CPU, under 3 minutes
    python bench.py --device cuda        # GPU: also the achieved TFLOP/s of the model step
    python bench.py --memory             # peak memory of a step, plain vs --micro-batch (gradient caching)
"""
import argparse
import ctypes
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from augment import BatchAugment, SimCLRTransform
from data import DATASETS, ResidentImages, TwoViews
from loss import nt_xent
from harness import Parser, amp_dtype, check_device
from train import build_model, build_optimizer, get_args_parser as train_args, resolve_args, train_step


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR benchmark", add_help=False)
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument("--arch", default="resnet18", help="(default: %(default)s)")
    p.add_argument("--width", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--stem-stride", type=int, default=1, choices=(1, 2), help="small stem (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=96, help="(default: %(default)s, STL-10)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 64 on CPU, 512 on CUDA)")
    p.add_argument("--aug-batch", type=int, default=256, help="images per augmentation call (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 30 on CUDA)")
    p.add_argument("--reps", type=int, default=5, help="timed calls of each smaller part (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="per-image loader workers (default: %(default)s)")
    p.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="(default: %(default)s)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: %(default)s)")
    p.add_argument("--aug-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile BatchAugment's kernels (default: as train.py, on for the CPU)")
    p.add_argument("--out", default="bench.json", help="(default: %(default)s)")
    g = p.add_argument_group("gradient caching (--memory)")
    g.add_argument("--memory", action="store_true",
                   help="instead of the table above: the peak memory of one training step, plain at --plain-batches "
                        "and with --micro-batch at --cached-batches, each in a fresh process; then the time per image "
                        "of both at --batch-size (default 256 here) with micro-batches of a quarter of it")
    g.add_argument("--micro-batch", type=int, default=256, help="(default: %(default)s)")
    g.add_argument("--plain-batches", type=int, nargs="+", default=[256, 512, 1024], help="(default: %(default)s)")
    g.add_argument("--cached-batches", type=int, nargs="+", default=[1024, 4096], help="(default: %(default)s)")
    return p


def timed(fn, reps, device, warmup=1):
    """Median seconds of fn() over reps runs, after warmup runs; synchronises CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class PILImages(torch.utils.data.Dataset):
    """The benchmark's uint8 images as RGB PIL images, like STL-10's loader returns them."""

    def __init__(self, images):
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), 0


def bench_augmentation(images, size, device, workers, aug_batch, compile_aug, reps):
    info = DATASETS["stl10"]
    x = images[:aug_batch].to(device)
    gen = torch.Generator().manual_seed(0)
    rates = {}
    for comp in sorted({False, compile_aug}):
        aug = BatchAugment(size, mean=info["mean"], std=info["std"], compile=comp).to(device)
        rates[comp] = aug_batch / timed(lambda: aug(torch.cat([x, x]), gen), reps, device, warmup=2)

    ds = TwoViews(PILImages(images), SimCLRTransform(size, mean=info["mean"], std=info["std"]), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=aug_batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)
    it = iter(loader)
    next(it)  # workers started and warm
    n = min(6, len(loader) - 1)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    per_image = n * aug_batch / (time.perf_counter() - t)
    return rates[compile_aug], rates[False], per_image


def bench_loss(device, reps):
    out = {}
    for two_n in (512, 4096):
        z = torch.randn(two_n, 128, device=device, requires_grad=True)

        def step():
            nt_xent(z[:two_n // 2], z[two_n // 2:], 0.5).backward()
        out[two_n] = timed(step, reps, device) * 1e3
    return out


def main(args):
    if args.memory:
        return bench_memory(args)
    device = check_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (512 if cuda else 64)
    steps = args.steps or (30 if cuda else 3)
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True
    n_images = max(4 * batch, 8 * args.aug_batch)
    images = torch.randint(0, 256, (n_images, 3, args.image_size, args.image_size), dtype=torch.uint8)
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device) if cuda else
           platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
           "torch": torch.__version__, "arch": args.arch, "width": args.width, "image_size": args.image_size,
           "stem_stride": args.stem_stride, "batch_size": batch, "amp": args.amp, "channels_last": args.channels_last}
    print(f"bench on {res['device']}, torch {torch.__version__}, {args.arch} x{args.width} at {args.image_size} px, "
          f"batch {batch}, amp {args.amp}")

    compile_aug = args.aug_compile if args.aug_compile is not None else not cuda or args.compile
    res["aug_compile"] = compile_aug
    res["aug_batched_img_s"], res["aug_batched_eager_img_s"], res["aug_per_image_img_s"] = bench_augmentation(
        images, args.image_size, device, args.workers, args.aug_batch, compile_aug, args.reps)
    loss_ms = bench_loss(device, args.reps)
    res["loss_ms"] = {"2N=512": loss_ms[512], "2N=4096": loss_ms[4096]}

    # model only: forward + backward + optimiser on views that are ready on the device
    model, opt, scaler, dtype = step_setup(args, device)
    net = torch.compile(model) if args.compile else model
    views = torch.randn(2 * batch, 3, args.image_size, args.image_size, device=device)
    model_s = timed(lambda: train_step(net, views, opt, scaler, dtype, 0.5, args.channels_last), steps, device, 2)
    res["model_only_img_s"] = batch / model_s

    # full step: gather from the resident uint8 data, two batched views, then the model step
    info = DATASETS["stl10"]
    resident = ResidentImages(images, torch.zeros(len(images), dtype=torch.long), device)
    aug = BatchAugment(args.image_size, mean=info["mean"], std=info["std"], compile=compile_aug).to(device)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images)).to(resident.images.device)  # no host-to-device copy per step

    def data():
        x, _ = resident.batch(perm[:batch])
        return x

    def full():
        x = data()
        train_step(net, aug(torch.cat([x, x]), gen), opt, scaler, dtype, 0.5, args.channels_last)

    step_s = timed(full, steps, device, 2)
    res["step_img_s"] = batch / step_s
    x = data()
    res["breakdown_ms"] = {"data": timed(data, args.reps, device) * 1e3,
                           "augment": timed(lambda: aug(torch.cat([x, x]), gen), args.reps, device) * 1e3,
                           "model": model_s * 1e3, "full_step": step_s * 1e3}
    with FlopCounterMode(display=False) as fc:  # forward + backward FLOPs of one view
        one = model(torch.randn(2, 3, args.image_size, args.image_size, device=device))[1]
        one.sum().backward()
    res["gflop_per_view"] = fc.get_total_flops() / 2 / 1e9
    res["model_tflop_s"] = res["gflop_per_view"] * 2 * res["model_only_img_s"] / 1e3
    res["step_tflop_s"] = res["gflop_per_view"] * 2 * res["step_img_s"] / 1e3
    res["step_over_model"] = res["step_img_s"] / res["model_only_img_s"]
    res["aug_speedup"] = res["aug_batched_img_s"] / res["aug_per_image_img_s"]

    rows = [(f"two-view augmentation, batched (BatchAugment{', compiled' if compile_aug else ''})",
             f"{res['aug_batched_img_s']:.0f} img/s"),
            ("two-view augmentation, batched, eager", f"{res['aug_batched_eager_img_s']:.0f} img/s"),
            (f"two-view augmentation, per image ({args.workers} workers)", f"{res['aug_per_image_img_s']:.0f} img/s"),
            ("  batched / per image", f"{res['aug_speedup']:.1f}x"),
            ("NT-Xent forward+backward, 2N=512", f"{loss_ms[512]:.2f} ms"),
            ("NT-Xent forward+backward, 2N=4096", f"{loss_ms[4096]:.2f} ms"),
            ("model only (fwd+bwd+LARS on ready views)", f"{res['model_only_img_s']:.0f} img/s"),
            ("full training step (data+aug+model)", f"{res['step_img_s']:.0f} img/s"),
            ("  full step / model only", f"{res['step_over_model']:.2f}x"),
            ("  breakdown per step: data / augment / model", "{data:.1f} / {augment:.1f} / {model:.1f} ms".format(
                **res["breakdown_ms"])),
            ("model FLOP per view (fwd+bwd)", f"{res['gflop_per_view']:.2f} GFLOP"),
            ("achieved, model only / full step", f"{res['model_tflop_s']:.2f} / {res['step_tflop_s']:.2f} TFLOP/s")]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{width}}  {b:>16}" for a, b in rows))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return res


# ------------------------------------------------------------------------------------------------ gradient caching

def bench_memory(args):
    """Peak memory of one step, plain and with --micro-batch, each in a fresh process, the peak of the plain step
    at the largest cached batch extrapolated by a line through the plain ones; then time per image of both."""
    device = check_device(args.device)
    ctx = multiprocessing.get_context("spawn")  # a fresh process per step: no allocator cache, no earlier peak
    runs = [(b, None) for b in args.plain_batches] + [(b, args.micro_batch) for b in args.cached_batches]
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else cpu_name(), "torch": torch.__version__, "arch": args.arch, "width": args.width,
           "image_size": args.image_size, "amp": args.amp, "micro_batch": args.micro_batch, "peak_mib": {}}
    print(f"peak memory of one step on {res['device']}, {args.arch} x{args.width} at {args.image_size} px, amp "
          f"{args.amp}, above the process with its model and optimiser built (views included)")
    for batch, micro in runs:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            try:
                mib = pool.submit(step_memory, args, batch, micro).result()
            except BrokenProcessPool:  # killed, by the kernel's out-of-memory killer most likely
                mib = None
        res["peak_mib"][f"{batch}/{micro or batch}"] = mib
        print(f"  batch {batch:>5}, micro-batch {micro or batch:>5}: " + (f"{mib:8.0f} MiB" if mib else "killed"),
              flush=True)
    plain = [(b, res["peak_mib"][f"{b}/{b}"]) for b in args.plain_batches if res["peak_mib"][f"{b}/{b}"]]
    slope, icpt = np.polyfit(*zip(*plain), 1) if len(plain) > 1 else (plain[0][1] / plain[0][0], 0.0)  # MiB/img, MiB
    big = max(args.cached_batches)
    res["plain_mib_per_image"], res["plain_extrapolated_mib"] = slope, icpt + slope * big
    res["extrapolated_over_cached"] = res["plain_extrapolated_mib"] / res["peak_mib"][f"{big}/{args.micro_batch}"]
    print(f"  plain, extrapolated to batch {big}: {res['plain_extrapolated_mib']:.0f} MiB ({slope:.2f} MiB per image)"
          f", {res['extrapolated_over_cached']:.1f}x the step with micro-batches of {args.micro_batch}")

    batch = args.batch_size or 256
    torch.manual_seed(0)
    model, opt, scaler, dtype = step_setup(args, device)
    views = torch.randn(2 * batch, 3, args.image_size, args.image_size, device=device)
    steps = {k: partial(train_step, model, views, opt, scaler, dtype, 0.5, args.channels_last, micro_batch=m)
             for k, m in (("plain", None), ("cached", batch // 4))}
    times = {k: [] for k in steps}
    for _ in range(args.steps or 3):  # interleaved, and the fastest of each: other jobs on a shared machine only slow
        for k, fn in steps.items():
            times[k].append(timed(fn, 1, device, warmup=0 if times[k] else 1))
    for k, t in times.items():
        res[f"ms_per_image_{k}"] = min(t) / batch * 1e3
    res["time_batch"], res["cached_over_plain_time"] = batch, res["ms_per_image_cached"] / res["ms_per_image_plain"]
    print(f"time per image at batch {batch}: plain {res['ms_per_image_plain']:.2f} ms, micro-batches of {batch // 4} "
          f"{res['ms_per_image_cached']:.2f} ms, {res['cached_over_plain_time']:.2f}x")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return res


def step_setup(args, device):
    """train.py's model, optimiser and scaler at its defaults, at the bench's arch, width, stem and image size."""
    targs = resolve_args(train_args().parse_args(["--arch", args.arch, "--width", str(args.width), "--device",
                                                  args.device, "--image-size", str(args.image_size),
                                                  "--stem-stride", str(args.stem_stride)]))
    targs.channels_last = args.channels_last
    model = build_model(targs, 1, device)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return model, build_optimizer(model, targs, 0.1), scaler, dtype


def step_memory(args, batch, micro):
    """In a fresh process: MiB that one training step (its views included) adds at its peak to the process with the
    model and optimiser built: CUDA's peak allocation, or the CPU's peak resident set (VmHWM, reset first)."""
    device = check_device(args.device)
    if device.type == "cpu":  # glibc keeps freed blocks in its arenas: the resident set would measure fragmentation
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: blocks >= 64 KiB are unmapped when freed
    torch.manual_seed(0)
    model, opt, scaler, dtype = step_setup(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set starts again from the current one
        base = proc_status("VmRSS")
    views = torch.randn(2 * batch, 3, args.image_size, args.image_size, device=device)  # (2N, 3, S, S)
    train_step(model, views, opt, scaler, dtype, 0.5, args.channels_last, micro_batch=micro)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status("VmHWM")
    return (peak - base) / 2 ** 20


def proc_status(key):
    """Bytes of a /proc/self/status entry (VmRSS, VmHWM: the resident set now, its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
