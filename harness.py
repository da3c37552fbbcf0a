"""The run's plumbing shared by the scripts, nothing of SimCLR in it: one-line errors and flag
types, devices, torchrun, AMP, atomic writes, checkpoint loading, RNG state, stop signals,
JSON-lines logs and their plot."""
import argparse
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# --------------------------------------------------------------------------------- errors and flags
class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (what is wrong, then --help), exit code 2."""

    def error(self, message):
        # "argument --lr: must be positive" -> "--lr must be positive"
        if message.startswith("argument "):
            flag, _, rest = message[len("argument "):].partition(": ")
            message = f"{flag.split('/')[0]} {rest}"
        self.exit(2, f"error: {message} (see --help)\n")


def die(msg, every_rank=False):
    """One actionable line on stderr, exit code 2, no traceback; under torchrun rank 0 speaks (or
    every rank with every_rank)."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or every_rank:
        several = int(os.environ.get("WORLD_SIZE", 1)) > 1
        prefix = f"[rank {rank}] " if every_rank and several else ""
        # on its own line, also below a progress bar
        tqdm.write(f"{prefix}error: {msg}", file=sys.stderr)
    sys.exit(2)


def checked(cast, ok, rule):
    """An argparse type: cast(text), then ok(value), else the one-line error
    '--flag RULE, got TEXT'."""
    def parse(text):
        value = cast(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    parse.__name__ = cast.__name__  # argparse names the type in "invalid float value"
    return parse


def at_least(low, cast=int):
    return checked(cast, lambda v: v >= low, f"must be at least {low}")


positive_int = checked(int, lambda v: v > 0, "must be positive")
positive_float = checked(float, lambda v: v > 0, "must be positive")  # NaN fails too
probability = checked(float, lambda v: 0 <= v <= 1, "is a probability: use a value in [0, 1]")


def ordered_pair(low, high=float("inf")):
    """argparse action for MIN MAX with low < MIN <= MAX <= high."""
    class OrderedPair(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            a, b = values
            if not low < a <= b <= high:
                top = f" <= {high}" if high < float("inf") else ""
                parser.error(f"{option_string} takes MIN MAX with {low} < MIN <= MAX{top}, "
                             f"got {a} {b}")
            setattr(namespace, self.dest, (a, b))
    return OrderedPair


def add_device_flags(group):
    """--device and --amp, the same in every script."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    group.add_argument("--device", default=default,
                       help="(default: %(default)s; under torchrun rank r takes cuda:LOCAL_RANK)")
    group.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"),
                       help="autocast dtype (default: %(default)s; fp16 with a GradScaler, CUDA "
                            "only, for GPUs without bf16)")


# ---------------------------------------------------------------------------------- devices and AMP
def check_device(name):
    """The torch.device of --device, a bare 'cuda' with the current GPU's index (tensors report
    cuda:0, and torch.device('cuda') != torch.device('cuda:0')); or one line on why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"--device {name} is not a device: use cpu, cuda or cuda:K")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        die(f"--device {name}, but torch finds no CUDA GPU here: use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        die(f"--device {name}, but there are {count} GPUs: use cuda:0 ... cuda:{count - 1}")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def setup_distributed(name):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process.
    -> (rank, world, device)"""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, check_device(name)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if name.startswith("cuda"):
        device = check_device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def amp_dtype(name, device):
    """The autocast dtype of --amp: None (off), bfloat16, or float16 (with a GradScaler; refused on
    the CPU)."""
    if name == "off":
        return None
    if name == "fp16" and device.type == "cpu":
        die("--amp fp16 on the CPU is emulated on most CPUs and runs many times slower: "
            "use --amp bf16 or --amp off")
    native_bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "bf16" and not native_bf16:
        print("bf16 is not supported on this GPU: using fp16 with a GradScaler")
        return torch.float16
    return torch.bfloat16 if name == "bf16" else torch.float16


def autocast(device, dtype):
    """Autocast to `dtype` on `device`; dtype None runs in float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# -------------------------------------------------------------------------------------------- files
def make_writable_dir(path, what, fix):
    """Create `path` and check that a file can be written in it, before any work; else one line
    naming `what`."""
    try:
        os.makedirs(path, exist_ok=True)
        test_file = os.path.join(path, f".write-test{os.getpid()}")
        open(test_file, "w").close()
        os.remove(test_file)
    except OSError as e:
        die(f"{what} is not writable ({e.strerror}): {fix}")


def atomic_write(path, write, mode="wb"):
    """write(file) into a temp file beside `path`, fsync, os.replace: `path` is never left
    half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, obj):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


# Checkpoints written before a flag existed lack it: the value those runs used.
CHECKPOINT_DEFAULTS = {"stem_stride": 1, "proj_layers": 2, "proj_out_bn": False,
                       "init": "torchvision"}


def load_checkpoint(path):
    ckpt, error = try_load(path)
    if error:
        die(error)
    return ckpt


def try_load(path):
    """(checkpoint, None) or (None, why not in one line). weights_only=True: a checkpoint cannot
    run code."""
    if not os.path.isfile(path):
        return None, (f"checkpoint {path} does not exist: check the path "
                      "(train.py writes OUTPUT_DIR/last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: one line, never a traceback
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return None, (f"{path} is not a readable checkpoint ({type(e).__name__}: {first}); "
                      "use a last.pt of train.py")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        return None, f"{path} is not a SimCLR checkpoint of train.py (no 'model'/'args' entries)"
    ckpt["args"] = {**CHECKPOINT_DEFAULTS, **ckpt["args"]}
    return ckpt, None


def agree_on_resume(path, world):
    """The checkpoint to resume from, or None, as rank 0 decides; `path` is each rank's own
    candidate. Every rank loads its copy and checks rank 0's step: a rank that cannot says so in one
    line, never hangs or diverges."""
    if world == 1:
        return load_checkpoint(path) if path else None
    ckpt, error = None, None
    if path and dist.get_rank() == 0:
        ckpt, error = try_load(path)
    group = dist.new_group(backend="gloo")  # small control messages, on the CPU whatever the device
    decision = [path is not None, ckpt["step"] if ckpt else -1, error]  # rank 0's
    dist.broadcast_object_list(decision, src=0, group=group)
    resume, step, error = decision
    if error:
        die(error)
    if not resume:
        return None
    if dist.get_rank() != 0:
        if path:
            ckpt, error = try_load(path)
        else:
            error = "no checkpoint in this rank's --output-dir"
        if ckpt is not None and ckpt["step"] != step:
            error = f"{path} holds step {ckpt['step']}"
    ok = torch.tensor([error is None], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not ok.item():
        why = error or "another rank cannot read it"
        die(f"rank 0 resumes from step {step}, but {why}: put --output-dir on a filesystem every "
            "node shares, or copy rank 0's last.pt to each node", every_rank=True)
    return ckpt


def changed_flags(old, new, ignore=()):
    """{flag: (old value, new value)} of two vars(args) dicts, leaving out `ignore` and the flags
    that `old` lacks."""
    def same(a, b):
        # a checkpoint keeps tuples or lists
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return list(a) == list(b)
        return a == b
    return {k: (old[k], v) for k, v in new.items()
            if k not in ignore and k in old and not same(old[k], v)}


def load_model_state(model, ckpt, path, flags, wanted=None):
    """Strict load; a checkpoint of another architecture is one line naming both by `flags`
    (arg names)."""
    def describe(a):
        return ", ".join(f"{k} {a.get(k)}" for k in flags if k in a)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        asked = f", but this run asks for {describe(wanted)}" if wanted else ""
        names = "/".join("--" + k.replace("_", "-") for k in flags)
        die(f"{path} holds a model with {describe(ckpt['args'])}{asked}: "
            f"pass the checkpoint's {names}, or another --output-dir")


def git_sha():
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


# ---------------------------------------------------------------------------------------- RNG state
def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_states():
    """Every generator's state, numpy's keys as a tensor so that weights_only loads accept them."""
    name, keys, *rest = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest],
            "python": random.getstate()}


def set_rng_states(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))


# ----------------------------------------------------------------------------------- logs and plots
def read_jsonl(path):
    """The rows of a JSON-lines file; a line torn by a kill while it was written is skipped."""
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path, step):
    """Drop the rows logged after `step`: those of a run resumed from an earlier checkpoint."""
    if os.path.exists(path):
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)


def figure(panels, width=5.0, height=3.6):
    """A matplotlib Figure and its row of `panels` axes (no pyplot: no GUI backend, no global
    state)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * panels, height))
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_jsonl(path, out, panels):
    """A PNG of a JSON-lines log: a panel per (title, {key: label}) that has data, each key against
    the step."""
    rows = read_jsonl(path)
    series = []
    for title, keys in panels:
        lines = []
        for key, label in keys.items():
            xy = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if xy:
                lines.append((label, xy))
        if lines:
            series.append((title, lines))
    if not series:
        return None
    fig, axes = figure(len(series), height=3.5)
    for ax, (title, lines) in zip(axes, series):
        for label, xy in lines:
            ax.plot(*zip(*xy), label=label, marker="o" if len(xy) < 20 else None)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    return save_figure(fig, out)


# ------------------------------------------------------------------------------------------ signals
class StopRequest:
    """SIGINT/SIGTERM stop the loop after the current step (a second one at once); under torchrun
    the ranks agree through a gloo all_reduce, so that they all stop after the same step."""

    def __init__(self, world):
        self.signal = None
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        self.restore()  # a second signal takes the default path: stop at once

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __bool__(self):
        """Whether to stop now; under torchrun a collective every rank calls after each step."""
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
