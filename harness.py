"""The run's plumbing shared by train.py, eval_linear.py and bench.py, nothing of SimCLR: one-line errors, flag types,
devices, torchrun, AMP dtype, atomic writes, checkpoint loading, RNG state, stop signals, JSON-lines logs, git SHA."""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# ------------------------------------------------------------------------------------------ errors and flags
class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (what is wrong, then --help), exit code 2."""

    def error(self, message):
        if message.startswith("argument "):  # "argument --lr: must be positive" -> "--lr must be positive"
            flag, _, rest = message[len("argument "):].partition(": ")
            message = f"{flag.split('/')[0]} {rest}"
        self.exit(2, f"error: {message} (see --help)\n")


def die(msg, every_rank=False):
    """One actionable line on stderr, exit code 2, no traceback; under torchrun rank 0 speaks, or every_rank."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or every_rank:
        prefix = f"[rank {rank}] " if every_rank and int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        tqdm.write(f"{prefix}error: {msg}", file=sys.stderr)  # on its own line, also below a progress bar
    sys.exit(2)


def checked(cast, ok, rule):
    """An argparse type: cast(text), then ok(value), else the one-line error '--flag RULE, got TEXT'."""
    def parse(text):
        if not ok(value := cast(text)):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    parse.__name__ = cast.__name__
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
                parser.error(f"{option_string} takes MIN MAX with {low} < MIN <= MAX{top}, got {a} {b}")
            setattr(namespace, self.dest, (a, b))
    return OrderedPair


# ------------------------------------------------------------------------------------------ devices
def check_device(name):
    """The torch.device of --device (a bare 'cuda' gets the current GPU's index), or one line why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"--device {name} is not a device: use cpu, cuda or cuda:K")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        die(f"--device {name}, but torch finds no CUDA GPU here: use --device cpu")
    if device.index is not None and device.index >= (n := torch.cuda.device_count()):
        die(f"--device {name}, but there are {n} GPUs: use cuda:0 ... cuda:{n - 1}")
    return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device


def setup_distributed(name):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process. -> (rank, world, device)"""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, check_device(name)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = check_device(f"cuda:{local}") if name.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return rank, world, device


def amp_dtype(name, device):
    """The autocast dtype of --amp: None (off), bfloat16, or float16 (with a GradScaler; refused on the CPU)."""
    if name == "off":
        return None
    if name == "fp16" and device.type == "cpu":
        die("--amp fp16 on the CPU is emulated on most CPUs and runs many times slower: use --amp bf16 or --amp off")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        print("bf16 is not supported on this GPU: using fp16 with a GradScaler")
        return torch.float16
    return torch.bfloat16 if name == "bf16" else torch.float16


# ------------------------------------------------------------------------------------------ files
def make_writable_dir(path, what, fix):
    """Create `path` and check that a file can be written in it, before any work; else one line naming `what`."""
    try:
        os.makedirs(path, exist_ok=True)
        test_file = os.path.join(path, f".write-test{os.getpid()}")
        open(test_file, "w").close()
        os.remove(test_file)
    except OSError as e:
        die(f"{what} is not writable ({e.strerror}): {fix}")


def save_checkpoint(path, obj, dump=torch.save, mode="wb"):
    """Atomic: dump into a temp file beside `path`, fsync, os.replace: what was written is never half-overwritten."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


save_json = partial(save_checkpoint, dump=partial(json.dump, indent=1), mode="w")


def load_checkpoint(path):
    ckpt, error = try_load(path)
    if error:
        die(error)
    return ckpt


def try_load(path):
    """(checkpoint, None) or (None, why not in one line). weights_only=True: a checkpoint cannot run code."""
    if not os.path.isfile(path):
        return None, f"checkpoint {path} does not exist: check the path (train.py writes OUTPUT_DIR/last.pt)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: one line, never a traceback
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return None, f"{path} is not a readable checkpoint ({type(e).__name__}: {first}); use a last.pt of train.py"
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        return None, f"{path} is not a SimCLR checkpoint of train.py (no 'model'/'args' entries)"
    return ckpt, None


def agree_on_resume(path, world):
    """The checkpoint to resume from, or None, as rank 0 decides; `path` is each rank's own candidate. Every rank
    loads its copy and checks rank 0's step: a rank that cannot says so in one line, never hangs or diverges."""
    if world == 1:
        return load_checkpoint(path) if path else None
    ckpt, error = try_load(path) if path and dist.get_rank() == 0 else (None, None)
    group = dist.new_group(backend="gloo")  # small control messages, on the CPU whatever the device
    decision = [path is not None, ckpt["step"] if ckpt else -1, error]  # rank 0's
    dist.broadcast_object_list(decision, src=0, group=group)
    resume, step, error = decision
    if error:
        die(error)
    if not resume:
        return None
    if dist.get_rank() != 0:
        ckpt, error = try_load(path) if path else (None, "no checkpoint in this rank's --output-dir")
        if ckpt is not None and ckpt["step"] != step:
            error = f"{path} holds step {ckpt['step']}"
    ok = torch.tensor([error is None], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not ok.item():
        die(f"rank 0 resumes from step {step}, but {error or 'another rank cannot read it'}: put --output-dir on a "
            "filesystem every node shares, or copy rank 0's last.pt to each node", every_rank=True)
    return ckpt


def changed_flags(old, new, ignore=()):
    """{flag: (old value, new value)} of two vars(args) dicts, leaving out `ignore` and flags `old` lacks."""
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 a checkpoint keeps tuples or lists
    return {k: (old[k], v) for k, v in new.items() if k not in ignore and k in old and norm(old[k]) != norm(v)}


def load_model_state(model, ckpt, path, flags, wanted=None):
    """Strict load; a checkpoint of another architecture is one line naming both by `flags` (arg names)."""
    def describe(a):
        return ", ".join(f"{k} {a.get(k)}" for k in flags if k in a)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        asked = f", but this run asks for {describe(wanted)}" if wanted else ""
        names = "/".join("--" + k.replace("_", "-") for k in flags)
        die(f"{path} holds a model with {describe(ckpt['args'])}{asked}: pass the checkpoint's {names}, "
            "or another --output-dir")


# ------------------------------------------------------------------------------------------ RNG state and logs
def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_states():
    """Every generator's state, numpy's keys as a tensor so that weights_only loads accept them."""
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest], "python": random.getstate()}


def set_rng_states(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))


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
    """Drop the rows logged after `step` (those of a run that is resumed from an earlier checkpoint)."""
    if os.path.exists(path):
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)


def plot_jsonl(path, out, panels):
    """A PNG of the JSON-lines log: a panel per (title, {key: label}) with data, each key against the step."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figures to close
    rows, series = read_jsonl(path), []
    for title, keys in panels:
        lines = [(label, [(r["step"], r[k]) for r in rows if r.get(k) is not None]) for k, label in keys.items()]
        if lines := [(label, xy) for label, xy in lines if xy]:
            series.append((title, lines))
    if not series:
        return
    fig = Figure(figsize=(5 * len(series), 3.5))
    for ax, (title, lines) in zip(fig.subplots(1, len(series), squeeze=False)[0], series):
        for label, xy in lines:
            ax.plot(*zip(*xy), label=label, marker="o" if len(xy) < 20 else None)
        ax.set(xlabel="step", title=title)
        if len(lines) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------ signals
class StopRequest:
    """SIGINT/SIGTERM stop the loop after the current step (a second one at once); under torchrun the ranks agree
    through a gloo all_reduce, so that they all stop after the same step."""

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
        """Whether to stop now (under torchrun a collective: every rank calls it after the same step)."""
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
