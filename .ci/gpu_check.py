"""The GPU check in one command: the CUDA tests, bench.py, train.py for 300 steps on a synthetic
96 px folder (batch 512 eager and compiled, batch 1024) and eval_linear.py, each part under its own
timeout, all within 8 minutes with a cold compile. Data, checkpoints and caches stay outside OUT,
which gets one small archive (logs, summary.json, the runs' metrics); the last lines printed are the
table of results.

    make gpu-check OUT=dir        # python .ci/gpu_check.py --out dir
    make gpu-check-cpu OUT=dir    # the same parts at tiny sizes on the CPU: CI's dry run
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each part and its budget in seconds on one GPU (H100/H200 class), the timeout it runs under. The
# sum is the check's budget: 455 s, under 8 minutes, so that one 10-minute command holds it with
# room to spare.
PARTS = [
    ("versions", 15),  # import torch, name the GPU
    ("cuda_tests", 75),  # pytest -m cuda: each test a few short runs
    ("bench", 45),  # bench.py: augmentation, loss, model and full step, 30 steps each
    ("data", 20),  # 4096 PNGs of 96 px written once, reused by a second check
    ("train_b512", 45),  # 300 steps at ~10k img/s, plus start-up and decoding the folder
    # a cold torch.compile of the model and the augmentation: 2-3 minutes
    ("train_b512_compile", 180),
    ("train_b1024", 45),
    ("eval", 30),  # eval_linear.py on train_b512's checkpoint
]
BUDGET = sum(seconds for _, seconds in PARTS)  # 455 s

GPU = dict(device="cuda", images=4096, size=96, batch=512, big_batch=1024, steps=300, width=1.0,
           bench=[], scale=1.0)
# the CPU dry run: the same commands at sizes that run in seconds; compiling on 2 cores takes longer
CPU = dict(device="cpu", images=64, size=32, batch=16, big_batch=32, steps=4, width=0.125,
           bench=["--batch-size", "4", "--aug-batch", "8", "--steps", "1", "--reps", "1",
                  "--workers", "0", "--width", "0.125", "--image-size", "32"], scale=4.0)


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR GPU check", add_help=False)
    p.add_argument("--out", required=True, help="folder for the archive gpu-check.tar.gz")
    p.add_argument("--cpu", action="store_true", help="the dry run: tiny sizes on the CPU (CI)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "simclr-gpu-check"),
                   help="data, runs and logs, outside OUT (default: %(default)s)")
    return p


def main(args):
    size = CPU if args.cpu else GPU
    os.makedirs(args.out, exist_ok=True)
    runs = os.path.join(args.work, "runs")
    logs = os.path.join(args.work, "logs")
    # a fresh run folder: never resume an earlier check's last.pt
    shutil.rmtree(runs, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    os.makedirs(logs)
    os.makedirs(runs)
    data = os.path.join(args.work, f"data-{size['size']}-{size['images']}")
    py = sys.executable
    train = [py, "train.py", "--dataset", "folder", "--data-dir", data,
             "--image-size", str(size["size"]), "--width", str(size["width"]),
             "--device", size["device"], "--max-steps", str(size["steps"]), "--log-every", "50"]
    commands = {
        "versions": [py, "-c", VERSIONS],
        "cuda_tests": [py, "-m", "pytest", "-q", "-m", "cuda", "tests"],
        "bench": [py, "bench.py", "--device", size["device"],
                  "--out", os.path.join(runs, "bench.json")] + size["bench"],
        "data": [py, "-c", WRITE_FOLDER, data, str(size["images"]), str(size["size"])],
        "train_b512": train + ["--batch-size", str(size["batch"]), "--output-dir", f"{runs}/b512"],
        "train_b512_compile": train + ["--batch-size", str(size["batch"]), "--compile",
                                       "--output-dir", f"{runs}/b512_compile"],
        "train_b1024": train + ["--batch-size", str(size["big_batch"]),
                                "--output-dir", f"{runs}/b1024"],
        "eval": [py, "eval_linear.py", "--ckpt", f"{runs}/b512/last.pt", "--device", size["device"],
                 "--output-dir", f"{runs}/eval", "--neighbours", "0"],
    }
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    results = []
    for name, budget in PARTS:
        timeout = budget * size["scale"]
        print(f"== {name} (timeout {timeout:.0f} s)", flush=True)
        t0 = time.time()
        log = os.path.join(logs, f"{name}.log")
        with open(log, "w") as f:
            try:
                rc = subprocess.run(commands[name], cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = time.time() - t0
        results.append(dict(part=name, ok=rc == 0, rc=rc, seconds=round(seconds, 1),
                            budget=timeout))
        print(f"   {'pass' if rc == 0 else 'FAIL'} ({rc}) in {seconds:.0f} s; {log}", flush=True)
    summary = collect(results, runs, logs)
    table = format_table(summary)
    archive = pack(args.out, summary, table, runs, logs)
    print(f"\narchive: {archive} ({os.path.getsize(archive) / 2 ** 20:.2f} MiB)")
    print(table)
    return 0 if all(r["ok"] for r in results) else 1


VERSIONS = ("import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', "
            "torch.cuda.get_device_name() if torch.cuda.is_available() else None)")
WRITE_FOLDER = """
import os, sys, torch, torchvision
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# a synthetic image folder with two classes (train/ and test/): no download
if not os.path.isdir(root):
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("test", max(8, n // 8))):
        for i in range(count):
            d = os.path.join(root + ".tmp", split, f"c{i % 2}")
            os.makedirs(d, exist_ok=True)
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            torchvision.io.write_png(img, os.path.join(d, f"{i}.png"))
    os.replace(root + ".tmp", root)
print("images in", root)
"""


def collect(results, runs, logs):
    """summary.json: each part's result, the bench's figures, each run's speed and peak memory."""
    summary = {"budget_seconds": BUDGET, "parts": results}
    with open(os.path.join(logs, "versions.log")) as f:
        summary["versions"] = f.read().strip().splitlines()[-1:] or [""]
    bench = os.path.join(runs, "bench.json")
    if os.path.exists(bench):
        with open(bench) as f:
            summary["bench"] = json.load(f)
    summary["runs"] = {}
    for path in sorted(glob.glob(os.path.join(runs, "*", "summary.json"))):
        with open(path) as f:
            summary["runs"][os.path.basename(os.path.dirname(path))] = json.load(f)
    eval_json = glob.glob(os.path.join(runs, "eval", "eval_*.json"))
    if eval_json:
        with open(eval_json[0]) as f:
            summary["eval_top1"] = json.load(f).get("top1")
    return summary


def format_table(summary):
    """The last lines printed: part, pass/fail, seconds against its budget, and the figures."""
    figures = {}
    bench = summary.get("bench")
    if bench:
        peak = f", peak {bench['peak_gpu_mib']} MiB" if bench.get("peak_gpu_mib") else ""
        figures["bench"] = [
            f"augmentation {bench['aug_batched_img_s']:.0f} img/s (batched), "
            f"{bench['aug_per_image_img_s']:.0f} (per image)",
            f"model only {bench['model_only_img_s']:.0f} img/s, "
            f"full step {bench['step_img_s']:.0f} img/s, {bench['step_tflop_s']:.1f} TFLOP/s{peak}"]
    for name, run in summary["runs"].items():
        peak = f", peak {run['peak_gpu_mib']} MiB" if run.get("peak_gpu_mib") is not None else ""
        figures[f"train_{name}"] = [
            f"{run['steps']} steps: {run['img_s_windows_median']} img/s (windows), "
            f"{run['img_s_end_to_end']} end to end, saves {100 * run['save_share']:.1f}%{peak}"]
    if summary.get("eval_top1") is not None:
        top1 = summary["eval_top1"]
        figures["eval"] = [f"linear probe top-1 {top1} (synthetic images: any value)"]
    figures["versions"] = summary["versions"]
    lines = [f"{'part':<20} {'result':<7} {'seconds':>8} {'budget':>7}  figures"]
    total = 0.0
    for r in summary["parts"]:
        total += r["seconds"]
        result = "pass" if r["ok"] else f"FAIL {r['rc']}"
        rows = figures.get(r["part"], [""])
        cells = f"{r['part']:<20} {result:<7} {r['seconds']:>8.0f} {r['budget']:>7.0f}"
        lines.append(f"{cells}  {rows[0]}")
        lines += [f"{'':<45}{row}" for row in rows[1:]]
    failed = [r["part"] for r in summary["parts"] if not r["ok"]]
    lines.append(f"{'total':<20} {'pass' if not failed else 'FAIL':<7} {total:>8.0f} "
                 f"{sum(r['budget'] for r in summary['parts']):>7.0f}  "
                 + (f"failed: {', '.join(failed)}" if failed else "every part passed"))
    return "\n".join(lines)


def pack(out, summary, table, runs, logs, tail_bytes=200_000):
    """OUT/gpu-check.tar.gz: summary.json, table.txt, each log's last 200 kB, each run's metrics."""
    archive = os.path.join(out, "gpu-check.tar.gz")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(tmp, "table.txt"), "w") as f:
            f.write(table + "\n")
        os.makedirs(os.path.join(tmp, "logs"))
        for log in glob.glob(os.path.join(logs, "*.log")):
            with open(log, "rb") as f:
                f.seek(max(0, os.path.getsize(log) - tail_bytes))
                tail = f.read()
            with open(os.path.join(tmp, "logs", os.path.basename(log)), "wb") as f:
                f.write(tail)
        for path in glob.glob(os.path.join(runs, "*", "metrics.jsonl")):
            name = os.path.basename(os.path.dirname(path))
            shutil.copy(path, os.path.join(tmp, f"metrics_{name}.jsonl"))
        with tarfile.open(archive + ".tmp", "w:gz") as tar:
            tar.add(tmp, arcname="gpu-check")
    os.replace(archive + ".tmp", archive)
    return archive


if __name__ == "__main__":
    sys.exit(main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args()))
