"""Throughput of the SimCLR pipeline (arXiv 2002.05709): two-view augmentation batched vs per
image, the NT-Xent loss, train.py's step on ready views and the full step; a table and bench.json.

    python bench.py                    # STL-10's recipe at 96 px, ResNet-18; minutes on a CPU
    python bench.py --arch resnet50 --width 0.25 --stem-stride 2 --image-size 28 --batch-size 256
    python bench.py --memory           # peak memory of a step, plain vs --micro-batch
    python bench.py ... --crops 0 2 4 6  # the full step's time per number of small crops
"""
import argparse
import ctypes
import datetime
import json
import multiprocessing
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

import train
from augment import BatchAugment, SimCLRTransform
from data import ResidentImages, TwoViews
from harness import Parser, amp_dtype, check_device
from loss import nt_xent


def get_args_parser():
    """train.py's flags (the model, its width and stem, the image size, AMP, channels-last, compile
    and the augmentation are timed as train.py builds them) and the benchmark's own."""
    p = argparse.ArgumentParser("SimCLR benchmark", add_help=False,
                                parents=[train.get_args_parser()])
    p.set_defaults(batch_size=None)  # 64 on the CPU, 512 on CUDA
    g = p.add_argument_group("benchmark")
    g.add_argument("--aug-batch", type=int, default=256,
                   help="images per augmentation call")
    g.add_argument("--steps", type=int, default=None,
                   help="timed steps (default: 3 on CPU, 30 on CUDA)")
    g.add_argument("--reps", type=int, default=5,
                   help="timed calls of each smaller part")
    g.add_argument("--out", default="bench.json")
    g = p.add_argument_group("gradient caching (--memory)")
    g.add_argument("--memory", action="store_true",
                   help="instead of the table above: the peak memory of one training step, plain "
                        "at --plain-batches and with --micro-batch (default 256 here) at "
                        "--cached-batches, each in a fresh process; then the time per image of "
                        "both at --batch-size (default 256 here) with micro-batches of a quarter "
                        "of it")
    g.add_argument("--plain-batches", type=int, nargs="+", default=[256, 512, 1024])
    g.add_argument("--cached-batches", type=int, nargs="+", default=[1024, 4096])
    g = p.add_argument_group("multi-crop (--crops)")
    g.add_argument("--crops", type=int, nargs="+",
                   help="instead of the table above: the full training step (data, the views, the "
                        "small crops, the model) with each of these numbers of small crops, timed "
                        "in interleaved rounds (--reps rounds of --steps steps, the fastest round "
                        "of each): ms per step and its ratio to the first")
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


def bench_augmentation(images, args, device, compile_aug):
    """(img/s of BatchAugment as train.py runs it, the same eager, SimCLRTransform in DataLoader
    workers)"""
    x = images[:args.aug_batch].to(device)
    gen = torch.Generator().manual_seed(0)
    rates = {}
    for comp in sorted({False, compile_aug}):
        aug = BatchAugment(train.image_spec(args), train.recipe(args), compile=comp).to(device)
        seconds = timed(lambda: aug(x, gen), args.reps, device, warmup=2)
        rates[comp] = args.aug_batch / seconds

    transform = SimCLRTransform(train.image_spec(args), train.recipe(args))
    ds = TwoViews(PILImages(images), transform, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.aug_batch, shuffle=True,
                                         num_workers=args.workers, drop_last=True,
                                         persistent_workers=args.workers > 0)
    it = iter(loader)
    next(it)  # workers started and warm
    n = min(6, len(loader) - 1)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    per_image = n * args.aug_batch / (time.perf_counter() - t)
    return rates[compile_aug], rates[False], per_image


def bench_loss(device, reps):
    """Milliseconds of NT-Xent forward + backward on (2N, 128) projections, 2N = 512 and 4096."""
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
    if args.crops:
        return bench_crops(args)
    device = check_device(args.device)
    cuda = device.type == "cuda"
    if args.batch_size is None:
        args.batch_size = 512 if cuda else 64
    train.resolve_args(args)
    batch = args.batch_size
    steps = args.steps or (30 if cuda else 3)
    size = args.image_size
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True
    n_images = max(4 * batch, 8 * args.aug_batch)
    images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8)
    res = {"date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
           "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "arch": args.arch,
           "width": args.width, "image_size": size, "stem_stride": args.stem_stride,
           "batch_size": batch, "amp": args.amp, "channels_last": args.channels_last}
    print(f"bench on {res['device']}, torch {torch.__version__}, {args.arch} x{args.width} at "
          f"{size} px, batch {batch}, amp {args.amp}")

    compile_aug = args.aug_compile if args.aug_compile is not None else not cuda or args.compile
    res["aug_compile"] = compile_aug
    aug_rates = bench_augmentation(images, args, device, compile_aug)
    res["aug_batched_img_s"], res["aug_batched_eager_img_s"], res["aug_per_image_img_s"] = aug_rates
    loss_ms = bench_loss(device, args.reps)
    res["loss_ms"] = {"2N=512": loss_ms[512], "2N=4096": loss_ms[4096]}

    # model only: forward + backward + optimiser on views that are ready on the device
    model, opt, scaler, dtype = step_setup(args, device)
    net = torch.compile(model) if args.compile else model
    views = torch.randn(2 * batch, 3, size, size, device=device)
    def model_step():
        train.train_step(net, views, opt, scaler, dtype, args)
    model_s = timed(model_step, steps, device, 2)
    res["model_only_img_s"] = batch / model_s

    # full step: gather from the resident uint8 data, two batched views, then the model step
    resident = ResidentImages(images, torch.zeros(len(images), dtype=torch.long), device)
    aug = BatchAugment(train.image_spec(args), train.recipe(args), compile=compile_aug).to(device)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images)).to(resident.images.device)  # no host-to-device copy per step

    def data():
        x, _ = resident.batch(perm[:batch])
        return x

    def full():
        x = data()
        train.train_step(net, aug(x, gen), opt, scaler, dtype, args)

    step_s = timed(full, steps, device, 2)
    res["step_img_s"] = batch / step_s
    x = data()
    augment_s = timed(lambda: aug(x, gen), args.reps, device)
    res["breakdown_ms"] = {"data": timed(data, args.reps, device) * 1e3, "augment": augment_s * 1e3,
                           "model": model_s * 1e3, "full_step": step_s * 1e3}
    with FlopCounterMode(display=False) as fc:  # forward + backward FLOPs of one view
        one = model(torch.randn(2, 3, size, size, device=device))[1]
        one.sum().backward()
    res["gflop_per_view"] = fc.get_total_flops() / 2 / 1e9
    res["model_tflop_s"] = res["gflop_per_view"] * 2 * res["model_only_img_s"] / 1e3
    res["step_tflop_s"] = res["gflop_per_view"] * 2 * res["step_img_s"] / 1e3
    res["step_over_model"] = res["step_img_s"] / res["model_only_img_s"]
    res["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20) if cuda else None
    res["aug_speedup"] = res["aug_batched_img_s"] / res["aug_per_image_img_s"]

    compiled = ", compiled" if compile_aug else ""
    rows = [(f"two-view augmentation, batched (BatchAugment{compiled})",
             f"{res['aug_batched_img_s']:.0f} img/s"),
            ("two-view augmentation, batched, eager",
             f"{res['aug_batched_eager_img_s']:.0f} img/s"),
            (f"two-view augmentation, per image ({args.workers} workers)",
             f"{res['aug_per_image_img_s']:.0f} img/s"),
            ("  batched / per image", f"{res['aug_speedup']:.1f}x"),
            ("NT-Xent forward+backward, 2N=512", f"{loss_ms[512]:.2f} ms"),
            ("NT-Xent forward+backward, 2N=4096", f"{loss_ms[4096]:.2f} ms"),
            ("model only (fwd+bwd+optimiser on ready views)",
             f"{res['model_only_img_s']:.0f} img/s"),
            ("full training step (data+aug+model)", f"{res['step_img_s']:.0f} img/s"),
            ("  full step / model only", f"{res['step_over_model']:.2f}x"),
            ("  breakdown per step: data / augment / model",
             "{data:.1f} / {augment:.1f} / {model:.1f} ms".format(**res["breakdown_ms"])),
            ("model FLOP per view (fwd+bwd)", f"{res['gflop_per_view']:.2f} GFLOP"),
            ("achieved, model only / full step",
             f"{res['model_tflop_s']:.2f} / {res['step_tflop_s']:.2f} TFLOP/s")]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{width}}  {b:>16}" for a, b in rows))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return res


def bench_memory(args):
    """Peak memory of one step, plain and with --micro-batch, each in a fresh process, the peak of
    the plain step at the largest cached batch extrapolated by a line through the plain ones; then
    the time per image of both."""
    device = check_device(args.device)
    args.batch_size = args.batch_size or 256
    args.micro_batch = args.micro_batch or 256
    micro_batch = args.micro_batch
    args = train.resolve_args(with_micro_batch(args, None))  # each step below sets its own
    # a fresh process per step: no allocator cache, no earlier peak
    ctx = multiprocessing.get_context("spawn")
    runs = [(b, None) for b in args.plain_batches] + [(b, micro_batch) for b in args.cached_batches]
    res = {"date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "torch": torch.__version__, "arch": args.arch, "width": args.width,
           "image_size": args.image_size, "amp": args.amp, "micro_batch": micro_batch,
           "peak_mib": {}}
    print(f"peak memory of one step on {res['device']}, {args.arch} x{args.width} at "
          f"{args.image_size} px, amp {args.amp}, above the process with its model and optimiser "
          "built (views included)")
    for batch, micro in runs:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            try:
                mib = pool.submit(step_memory, args, batch, micro).result()
            except BrokenProcessPool:  # killed, by the kernel's out-of-memory killer most likely
                mib = None
        res["peak_mib"][f"{batch}/{micro or batch}"] = mib
        shown = f"{mib:8.0f} MiB" if mib else "killed"
        print(f"  batch {batch:>5}, micro-batch {micro or batch:>5}: {shown}", flush=True)
    measured = [(b, res["peak_mib"][f"{b}/{b}"]) for b in args.plain_batches]
    plain = [(b, mib) for b, mib in measured if mib]
    if len(plain) > 1:
        slope, intercept = np.polyfit(*zip(*plain), 1)  # MiB per image, MiB
    else:
        slope, intercept = plain[0][1] / plain[0][0], 0.0
    big = max(args.cached_batches)
    res["plain_mib_per_image"] = slope
    res["plain_extrapolated_mib"] = intercept + slope * big
    cached = res["peak_mib"][f"{big}/{micro_batch}"]
    res["extrapolated_over_cached"] = res["plain_extrapolated_mib"] / cached
    print(f"  plain, extrapolated to batch {big}: {res['plain_extrapolated_mib']:.0f} MiB "
          f"({slope:.2f} MiB per image), {res['extrapolated_over_cached']:.1f}x the step with "
          f"micro-batches of {micro_batch}")

    batch = args.batch_size
    torch.manual_seed(0)
    model, opt, scaler, dtype = step_setup(args, device)
    views = torch.randn(2 * batch, 3, args.image_size, args.image_size, device=device)
    steps = {}
    for k, m in (("plain", None), ("cached", batch // 4)):
        step_args = with_micro_batch(args, m)
        steps[k] = partial(train.train_step, model, views, opt, scaler, dtype, step_args)
    times = {k: [] for k in steps}
    # interleaved, and the fastest of each: other jobs only slow a step
    for _ in range(args.steps or 3):
        for k, fn in steps.items():
            times[k].append(timed(fn, 1, device, warmup=0 if times[k] else 1))
    for k, t in times.items():
        res[f"ms_per_image_{k}"] = min(t) / batch * 1e3
    res["time_batch"] = batch
    res["cached_over_plain_time"] = res["ms_per_image_cached"] / res["ms_per_image_plain"]
    print(f"time per image at batch {batch}: plain {res['ms_per_image_plain']:.2f} ms, "
          f"micro-batches of {batch // 4} {res['ms_per_image_cached']:.2f} ms, "
          f"{res['cached_over_plain_time']:.2f}x")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return res


def bench_crops(args):
    """The full step at each number of small crops in --crops, interleaved: what an equal-time
    comparison of multi-crop needs (fewer steps where a step costs more)."""
    device = check_device(args.device)
    args.batch_size = args.batch_size or 64
    train.resolve_args(args)
    batch = args.batch_size
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4 * batch, 3, args.image_size, args.image_size),
                           dtype=torch.uint8, device=device)
    model, opt, scaler, dtype = step_setup(args, device)
    compile_aug = args.aug_compile if args.aug_compile is not None else device.type == "cpu"
    aug = BatchAugment(train.image_spec(args), train.recipe(args), compile=compile_aug).to(device)
    small_spec, small_recipe = train.small_crops(args)
    small_aug = BatchAugment(small_spec, small_recipe, compile=compile_aug).to(device)
    gen = torch.Generator().manual_seed(0)

    def step(v):
        x = images[torch.randperm(len(images), generator=gen)[:batch].to(device)]
        views = aug(x, gen)
        step_args = argparse.Namespace(**{**vars(args), "small_crops": v})
        crops = [views, small_aug(x, gen, views=v)] if v else views
        train.train_step(model, crops, opt, scaler, dtype, step_args)

    res = {"date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "arch": args.arch,
           "width": args.width, "stem_stride": args.stem_stride, "image_size": args.image_size,
           "small_size": args.small_size, "batch_size": batch, "amp": args.amp, "ms_per_step": {}}
    print(f"full step per number of small crops on {res['device']}, {args.arch} x{args.width}, "
          f"{args.image_size} px views, {args.small_size} px small crops, batch {batch}")
    times = {v: [] for v in args.crops}
    for _ in range(args.reps):  # interleaved: a slower minute slows every candidate alike
        for v in args.crops:
            times[v].append(timed(partial(step, v), args.steps or 3, device,
                                  warmup=0 if times[v] else 1))
    first = min(times[args.crops[0]])
    for v in args.crops:
        ms = min(times[v]) * 1e3
        res["ms_per_step"][str(v)] = ms
        print(f"  {v} small crops: {ms:8.1f} ms per step, {ms / (first * 1e3):.2f}x")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return res


def with_micro_batch(args, micro_batch):
    return argparse.Namespace(**{**vars(args), "micro_batch": micro_batch})


def step_setup(args, device):
    """train.py's model, optimiser and scaler for the flags (the rate does not matter here)."""
    model = train.build_model(args, 1, device)
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return model, train.build_optimizer(model, args, 0.1), scaler, dtype


def step_memory(args, batch, micro):
    """In a fresh process: MiB that one training step (its views included) adds at its peak to the
    process with the model and optimiser built: CUDA's peak allocation, or the CPU's peak resident
    set (VmHWM, reset first)."""
    device = check_device(args.device)
    # glibc keeps freed blocks in its arenas: the resident set would show them
    if device.type == "cpu":
        # M_MMAP_THRESHOLD: blocks >= 64 KiB unmapped when freed
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    torch.manual_seed(0)
    model, opt, scaler, dtype = step_setup(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set starts again from the current one
        base = proc_status("VmRSS")
    # the views of one step of `batch` images: (2N, 3, S, S)
    views = torch.randn(2 * batch, 3, args.image_size, args.image_size, device=device)
    train.train_step(model, views, opt, scaler, dtype, with_micro_batch(args, micro))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = proc_status("VmHWM")
    return (peak - base) / 2 ** 20


def proc_status(key):
    """Bytes of a /proc/self/status entry (VmRSS, VmHWM: the resident set now, its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0]
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main(Parser(parents=[get_args_parser()]).parse_args())
