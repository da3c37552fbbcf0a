"""The scripts' plumbing: one-line errors and flag types, devices, torchrun, AMP, atomic writes,
checkpoints, RNG state, stop signals, JSON-lines logs and their plots, and `Run`, a training run's
files and bookkeeping (checkpoint, resume, log, save cadence)."""
import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# --------------------------------------------------------------------------------- errors and flags
class DefaultsFormatter(argparse.HelpFormatter):
    """--help appends "(default: VALUE)" to every flag with a default, but where the help already
    says "(default: ...)", as a flag whose default is resolved later (None) does."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse whose --help shows the defaults and whose errors are one line (what is wrong, then
    --help), exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

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
                       help="under torchrun rank r takes cuda:LOCAL_RANK")
    group.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"),
                       help="autocast dtype; fp16 with a GradScaler, CUDA only, for GPUs without "
                            "bf16")


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

    def requested(self):
        """Whether to stop now. Under torchrun a collective (an all_reduce over the ranks): every
        rank calls it after each step."""
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


# ---------------------------------------------------------------------------------- a training run
class Run:
    """A training run's files in OUTPUT_DIR and the bookkeeping of its loop. last.pt holds each
    `state` object's state_dict ({"model": ..., "optimizer": ..., ...}), the step, the args, the RNG
    states, the training seconds and the history of --extend, written atomically; metrics.jsonl a
    row per log line; curves.png the `panels` of those rows; summary.json the run's speed. Every
    rank resumes; only rank 0 writes. args: output_dir, resume, extend, batch_size, log_every and
    the save cadence (save_every, save_every_epochs, save_every_minutes)."""

    def __init__(self, args, rank, world, device, state, steps_per_epoch, total_steps, panels=()):
        self.args = args
        self.main = rank == 0
        self.world = world
        self.device = device
        self.state = {name: obj for name, obj in state.items() if obj is not None}
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.panels = panels
        self.log_extras = []  # callables -> {key: value} added to every log row
        self.epoch_end = []  # callables (step, epoch), after each epoch's bookkeeping
        self.seconds_before = 0.0  # training time of the runs this one resumes
        self.t_start = time.time()
        self.resumed_from = None
        self.history = []  # [{"step", "changed": {flag: (old, new)}}] of each --extend
        self.ckpt_path = os.path.join(args.output_dir, "last.pt")
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")

    # -- resume and save
    def resume(self, neutral, extendable, model_flags, neutral_on_one_rank=()):
        """The step to start from: 0, or that of --resume / OUTPUT_DIR/last.pt (rank 0 decides),
        whose states are loaded. A checkpoint made with other flags is refused in one line, but for
        the `neutral` flags, which cannot change what the run computes, for `neutral_on_one_rank`
        where either run had a single rank, and for the `extendable` flags with --extend.
        model_flags: the flags that name the model in an error."""
        args = self.args
        path = args.resume
        if path is None and os.path.exists(self.ckpt_path):
            path = self.ckpt_path
        ckpt = agree_on_resume(path, self.world)
        if ckpt is None:
            return 0
        load_model_state(self.state["model"], ckpt, path, model_flags, vars(args))
        ignore = set(neutral)
        if min(ckpt["world_size"], self.world) == 1:
            ignore |= set(neutral_on_one_rank)
        changed = changed_flags(ckpt["args"], vars(args), ignore)
        if changed and not (args.extend and set(changed) <= extendable):
            names = ", ".join(f"--{k.replace('_', '-')} {old} -> {new}"
                              for k, (old, new) in changed.items())
            if args.extend:
                allowed = "/".join("--" + k.replace("_", "-") for k in sorted(extendable))
                fix = f"--extend changes only {allowed}"
            else:
                fix = ("rerun with the checkpoint's flags, pass --extend to change "
                       "--epochs/--max-steps on purpose")
            die(f"{path} was made with other flags ({names}): {fix}, or use another --output-dir")
        self.history = ckpt.get("history", [])
        if changed:
            self.history = self.history + [{"step": ckpt["step"], "changed": changed}]
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            die(f"{path} was written with {ckpt['steps_per_epoch']} steps per epoch, this run has "
                f"{self.steps_per_epoch} (other data?): resume on the checkpoint's data, or use "
                "another --output-dir")
        for name, obj in self.state.items():
            if name != "model" and name in ckpt:  # a monitor added on resume starts afresh
                obj.load_state_dict(ckpt[name])
        set_rng_states(ckpt["rng"])
        step = ckpt["step"]
        self.seconds_before = ckpt["train_seconds"]
        self.resumed_from = path
        if self.main:
            print(f"resumed from {path} at step {step} (epoch {step // self.steps_per_epoch})",
                  flush=True)
            truncate_jsonl(self.metrics_path, step)
        return step

    def seconds(self):
        """Training seconds over every part of the run."""
        return self.seconds_before + time.time() - self.t_start

    def save(self, step):
        if not self.main:
            return
        ckpt = {name: obj.state_dict() for name, obj in self.state.items()}
        ckpt.update(step=step, epoch=step // self.steps_per_epoch,
                    steps_per_epoch=self.steps_per_epoch, world_size=self.world,
                    args=vars(self.args), rng=rng_states(), history=self.history,
                    train_seconds=self.seconds())
        atomic_write(self.ckpt_path, lambda f: torch.save(ckpt, f))

    # -- the loop's bookkeeping
    def start(self, step):
        """Before the first step: clocks, progress bar, stop signals."""
        self.stop = StopRequest(self.world)
        self.bar = tqdm(total=self.total_steps, initial=step,
                        disable=True if not self.main else None, dynamic_ncols=True)
        self.first_step = step
        self.t_start = time.time()  # training time starts now, not at setup
        self.t_log = self.t_start
        self.images_since_log = 0
        self.last_save = time.monotonic()
        self.timing = dict(start=time.monotonic(), save_seconds=0.0, window_rates=[])
        # the values of each step since the last log line, on the device: read once per line, so
        # that no step waits for the host
        self.window = []
        self.epoch_rows = []  # (means of a log line's window, its steps) in this epoch
        self.stopped_by = None

    def after_step(self, step, epoch, lr, values):
        """Everything after optimiser step number `step` (counted from 1) but the step itself: log
        the `values` ({name: 0-d tensor on the device, "loss" first}) once per --log-every steps,
        save at an epoch's end, every --save-every steps and on a stop signal. -> whether to stop
        (a signal: the checkpoint is saved)."""
        self.window.append(torch.stack(list(values.values())))
        self.images_since_log += self.args.batch_size
        self.bar.update()
        end_of_epoch = step % self.steps_per_epoch == 0 or step == self.total_steps
        # every rank asks, after the same step
        stopping = self.stop.requested() and step < self.total_steps
        if step % self.args.log_every == 0 or end_of_epoch:
            self.log_line(step, epoch, lr, list(values))

        # at an epoch's end, every --save-every-epochs once --save-every-minutes have passed: a
        # checkpoint costs about a second, which is 10-20% of an epoch of a few seconds
        a = self.args
        minutes_passed = time.monotonic() - self.last_save >= 60 * a.save_every_minutes
        every_epochs = (epoch + 1) % a.save_every_epochs == 0 and minutes_passed
        epoch_due = end_of_epoch and (every_epochs or step == self.total_steps)
        steps_due = a.save_every and step % a.save_every == 0
        saving = epoch_due or steps_due or stopping
        t_save = time.monotonic()
        if saving:
            self.check_finite(step)  # never save a diverged model over a good one
            self.save(step)
            self.last_save = time.monotonic()
        if epoch_due:
            self.plot()
        self.timing["save_seconds"] += time.monotonic() - t_save
        if end_of_epoch:
            self.epoch_line(step, epoch, list(values), epoch_due)
            for hook in self.epoch_end:
                hook(step, epoch)
        if saving or end_of_epoch:  # the logged img/s counts training, not saves and monitors
            self.t_log = time.time()
            self.images_since_log = 0
        if stopping:
            self.stopped_by = self.stop.signal
        return stopping

    def log_line(self, step, epoch, lr, names):
        """The one host read per log line: the window's means into metrics.jsonl and the bar."""
        means = self.check_finite(step).mean(0).tolist()
        self.epoch_rows.append((means, len(self.window)))
        img_s = self.images_since_log / (time.time() - self.t_log)
        self.timing["window_rates"].append(img_s)
        row = {"step": step, "epoch": epoch, **dict(zip(names, means)), "lr": lr, "img_s": img_s,
               "time": self.seconds()}
        for extra in self.log_extras:
            row.update(extra())
        self.bar.set_postfix(epoch=epoch, loss=f"{means[0]:.4f}", lr=f"{lr:.3g}",
                             img_s=f"{img_s:.0f}")
        self.log(row)
        self.window = []
        self.t_log = time.time()
        self.images_since_log = 0

    def epoch_line(self, step, epoch, names, saved):
        """The epoch's means, weighted by the steps of each log line."""
        steps = max(1, sum(k for _, k in self.epoch_rows))
        means = [sum(row[i] * k for row, k in self.epoch_rows) / steps for i in range(len(names))]
        self.epoch_rows = []
        if self.main:
            values = ", ".join(f"{name} {value:.4g}" for name, value in zip(names, means))
            where = f", saved {self.ckpt_path}" if saved else ""
            tqdm.write(f"epoch {epoch} done: step {step}/{self.total_steps}, mean {values}{where}")

    def check_finite(self, step):
        """The window's rows (steps, values), averaged over the ranks so that all decide alike; a
        loss (the first value) that is not finite stops the run in one line."""
        window = self.window
        rows = torch.stack(window).float() if window else torch.zeros(0, 1)
        if self.world > 1 and window:
            dist.all_reduce(rows)
            rows /= self.world
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

    def end(self, step):
        """After the last step: the bar closed, the signals restored, the summary written."""
        self.stop.restore()
        self.bar.close()
        return self.summarize(step, step - self.first_step)

    def summarize(self, step, steps):
        """The run's speed, end to end: images trained over the wall time from the first step to the
        last, checkpoints and monitors included, beside the median of the logged windows (which
        leave them out); the share of time saving; peak GPU memory. OUTPUT_DIR/summary.json (of this
        process's steps) and a JSON line."""
        timing = self.timing
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
            path = os.path.join(self.args.output_dir, "summary.json")
            atomic_write(path, lambda f: json.dump(dict(summary, step=step), f, indent=1), mode="w")
            print(json.dumps({"summary": summary}), flush=True)
        return summary

    def log(self, row):
        if self.main:
            append_jsonl(self.metrics_path, row)

    def plot(self):
        if self.main:
            plot_jsonl(self.metrics_path, os.path.join(self.args.output_dir, "curves.png"),
                       self.panels)
