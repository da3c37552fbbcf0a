"""Recipe search on validation images for a short SimCLR run (arXiv 2002.05709's ablations at CPU
scale): pretrain a base recipe and one change at a time, score each by the linear probe on images
held out of the training split (the test split is never read), then combine the winning changes.

    make search            # the demo's recipe and its candidates, two runs at a time
    make recheck           # the demo's settings against their neighbours, and a second seed
    make multicrop         # the demo's recipe with small crops, at equal time, two seeds each
    python search.py --base "--dataset fashion-mnist ..." --out runs/search --jobs 2

Writes OUT/search_CHANGES.md (the table) and OUT/search_CHANGES.json; rerunning skips the runs
already scored, also those another set of changes shares (the base, its second seed).
"""
import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))

# One change at a time from the base recipe: (axis, name, train.py flags), in named sets. The
# network's shape and the batch are compared at equal pretraining time (their steps scaled by their
# measured speed), everything else at equal steps. A change the base already has is skipped.
SEED_1 = ", seed 1"  # a candidate again with --seed 1: the speed of the one without it
CHANGE_SETS = {
    "recipe": [
        ("arch", "resnet18 w0.5", ["--arch", "resnet18", "--width", "0.5"]),
        ("tau", "tau 0.1", ["--temperature", "0.1"]),
        ("tau", "tau 0.5", ["--temperature", "0.5"]),
        ("crop", "crop scale 0.08", ["--crop-scale", "0.08", "1"]),
        ("colour", "colour strength 0.5", ["--jitter-strength", "0.5"]),
        ("lr", "LARS rate 2.4", ["--lr", "2.4"]),
        ("lr", "LARS rate 9.6", ["--lr", "9.6"]),
        # the official code's init is the default
        ("init", "torchvision init", ["--init", "torchvision"]),
    ],
    # the demo's settings that were first tuned on the test split, each against its neighbours on
    # validation, and the base again with another seed: the table's own noise
    "recheck": [
        ("seed", "seed 1", ["--seed", "1"]),
        ("crop", "crop scale 0.15", ["--crop-scale", "0.15", "1"]),
        ("crop", "crop scale 0.35", ["--crop-scale", "0.35", "1"]),
        ("crop", "crop scale 0.5", ["--crop-scale", "0.5", "1"]),
        ("warmup", "warmup 0.1 epochs", ["--warmup-epochs", "0.1"]),
        ("warmup", "warmup 0.6 epochs", ["--warmup-epochs", "0.6"]),
        ("lr", "LARS rate 2.4", ["--lr", "2.4"]),
        ("lr", "LARS rate 9.6", ["--lr", "9.6"]),
        ("stem", "stem stride 1", ["--stem-stride", "1"]),
        ("batch", "batch 128", ["--batch-size", "128"]),
        ("batch", "batch 512", ["--batch-size", "512"]),
    ],
    # multi-crop (SwAV): V small crops of 12 px beside the two 28 px views, their scale up to the
    # views' lower bound (SwAV's split: 0.05-0.14 below 0.14-1), at equal pretraining time; two
    # seeds each, the base's second seed as in "recheck"
    "multicrop": [("seed", "seed 1", ["--seed", "1"])] + [
        ("crops", f"{v} small crops{seed_name}",
         ["--small-crops", str(v), "--small-size", "12", "--small-crop-scale", "0.05", "0.25"]
         + seed_flags)
        for v in (2, 4, 6)
        for seed_name, seed_flags in (("", []), (SEED_1, ["--seed", "1"]))],
}
EQUAL_TIME = {"arch", "stem", "batch", "crops"}  # axes compared at equal pretraining time
NOT_COMBINED = {"seed"}  # axes that measure noise, not a recipe
# steps of each architecture's speed measurement; the first window (compiling) is left out
CALIBRATION_STEPS = 60


def get_args_parser():
    p = argparse.ArgumentParser("SimCLR recipe search on validation", add_help=False)
    p.add_argument("--base", required=True,
                   help="train.py flags of the base recipe, one string (make search passes the "
                        "demo's)")
    p.add_argument("--changes", nargs="+", default=["recipe"], choices=list(CHANGE_SETS),
                   help="which sets of changes to try; several share their calibration and runs, "
                        "a table each (default: %(default)s)")
    p.add_argument("--out", default=os.path.join("runs", "search"), help="(default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time, each with cpu_count / jobs threads (default: %(default)s)")
    p.add_argument("--python", default=sys.executable, help="(default: this interpreter)")
    return p


def main(args):
    base = shlex.split(args.base)
    os.makedirs(args.out, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runner = Runner(args.python, args.out, threads)
    print(f"search in {args.out}: {args.jobs} runs at a time, {threads} thread(s) each; "
          f"base: {args.base}")

    # 1. each network's and batch's speed, alone on the machine, so that they train for equal time
    steps = int(flag_value(base, "--max-steps")[0])
    candidates = {}  # set of changes -> [(axis, name, flags)]
    for changes in args.changes:
        candidates[changes] = [("base", "base", [])]
        for axis, name, change in CHANGE_SETS[changes]:
            if all(flag_value(base, f) == flag_value(change, f) for f in flags_of(change)):
                continue  # the base already has this value
            if axis in EQUAL_TIME:
                change = change + equal_time_flags(base, name, change, steps, runner)
            candidates[changes].append((axis, name, change))

    # 2. the candidates of every set, `jobs` at a time, each run once
    runs = {}
    for cands in candidates.values():
        runs.update({name: argv for _, name, argv in cands})
    with ThreadPoolExecutor(args.jobs) as pool:
        scores = dict(zip(runs, pool.map(lambda n: runner.score(n, base + runs[n]), runs)))

    for changes, cands in candidates.items():
        if any(axis in NOT_COMBINED for axis, _, _ in cands):
            chosen = adopt(cands, scores)
        else:
            chosen = combine(cands, scores, runner, base)
        write_table(args.base, changes, args.out, cands, scores, chosen, runner.rates)
    return scores


def seed_groups(candidates, scores):
    """Each run's top-1 with its second seed's (the base's second seed is "seed 1")."""
    groups = {}
    for _, name, _ in candidates:
        key = "base" if name == "seed 1" else name.removesuffix(SEED_1)
        groups.setdefault(key, []).append(scores[name]["top1"])
    return groups


def adopt(candidates, scores):
    """In a set with the base's second seed: the best change (the mean of its seeds) when it beats
    the base's mean by more than the base's two seeds differ, otherwise the base."""
    groups = seed_groups(candidates, scores)
    noise = max(groups["base"]) - min(groups["base"])
    best = max(groups, key=lambda k: statistics.mean(groups[k]))
    gain = statistics.mean(groups[best]) - statistics.mean(groups["base"])
    name = best if gain > noise else "base"
    return next(c for c in candidates if c[1] == name)


def combine(candidates, scores, runner, base):
    """The winners of each axis together, run once more; returns the best candidate."""
    best = {}
    for axis, name, change in candidates[1:]:
        if scores[name]["top1"] > scores["base"]["top1"] and (
                axis not in best or scores[name]["top1"] > scores[best[axis][0]]["top1"]):
            best[axis] = (name, change)
    if len(best) > 1:
        combined = [f for _, change in best.values() for f in change]
        name = " + ".join(n for n, _ in best.values())
        candidates.append(("combined", name, combined))
        scores[name] = runner.score(name, base + combined)
    return max(candidates, key=lambda c: scores[c[1]]["top1"])


def flags_of(tokens):
    return [t for t in tokens if t.startswith("--")]


def flag_value(tokens, flag):
    """The values after the last `flag` in a train.py argument list (argparse keeps the last);
    None without it."""
    if flag not in tokens:
        return None
    i = len(tokens) - 1 - tokens[::-1].index(flag)
    values = []
    for t in tokens[i + 1:]:
        if t.startswith("--"):
            break
        values.append(t)
    return values


def equal_time_flags(base, name, change, steps, runner):
    """--max-steps that give the candidate (another network or batch) the base's pretraining time:
    steps x batch / img/s, the same for both; --epochs and --warmup-epochs scaled so that the run
    can hold the steps and warms up for the same share of them."""
    base_rate = runner.rate("calibrate base", base)
    rate = runner.rate("calibrate " + name.removesuffix(SEED_1), base + change)
    batch = int(flag_value(base + change, "--batch-size")[0])
    base_batch = int(flag_value(base, "--batch-size")[0])
    new_steps = round(steps * base_batch / batch * rate / base_rate)
    epochs = int(flag_value(base, "--epochs")[0])
    warmup = float(flag_value(base, "--warmup-epochs")[0])
    # the base's epochs hold its steps at its batch, so these hold new_steps at this batch
    factor = math.ceil(new_steps * batch / (steps * base_batch))
    return ["--max-steps", str(new_steps), "--epochs", str(epochs * factor),
            "--warmup-epochs", f"{warmup * factor:g}"]


class Runner:
    """Runs train.py and eval_linear.py in fresh processes, each run with its folder and log."""

    def __init__(self, python, out, threads):
        self.python = python
        self.out = out
        self.threads = threads
        self.rates = {}

    def folder(self, name):
        return os.path.join(self.out, name.replace(" ", "_").replace("+", "and"))

    def run(self, name, script, argv, threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        os.makedirs(self.folder(name), exist_ok=True)
        with open(os.path.join(self.folder(name), "search.log"), "a") as log:
            log.write(f"$ {script} {shlex.join(argv)}\n")
            log.flush()
            done = subprocess.run([self.python, os.path.join(HERE, script), *argv], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"error: {name}: {script} failed (exit {done.returncode}); see "
                             f"{os.path.join(self.folder(name), 'search.log')}")

    def rate(self, name, argv):
        """Median img/s of train.py's logged windows over CALIBRATION_STEPS steps, all threads."""
        metrics = os.path.join(self.folder(name), "metrics.jsonl")
        if not os.path.exists(metrics):
            short = ["--max-steps", str(CALIBRATION_STEPS), "--log-every", "10",
                     "--output-dir", self.folder(name)]
            self.run(name, "train.py", argv + short, os.cpu_count() or 1)
        rows = [json.loads(line) for line in open(metrics) if '"img_s"' in line]
        self.rates[name] = statistics.median(r["img_s"] for r in rows[1:])
        print(f"{name}: {self.rates[name]:.0f} img/s", flush=True)
        return self.rates[name]

    def score(self, name, argv):
        """The validation top-1 of the linear probe on the run's encoder, its pretraining time."""
        folder = self.folder(name)
        dataset = flag_value(argv, "--dataset")[0]
        result = os.path.join(folder, f"eval_{dataset}_val.json")
        if not os.path.exists(result):
            t0 = time.time()
            self.run(name, "train.py", argv + ["--output-dir", folder], self.threads)
            probe = ["--ckpt", os.path.join(folder, "last.pt"), "--eval-on", "val"]
            self.run(name, "eval_linear.py", probe, self.threads)
            print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
        with open(result) as f:
            summary = json.load(f)
        print(f"{name}: validation top-1 {summary['simclr_top1']:.2f}", flush=True)
        return {"top1": summary["simclr_top1"], "pretrain_seconds": summary["pretrain_seconds"]}


def write_table(base, changes, out, candidates, scores, chosen, rates):
    base_top1 = scores["base"]["top1"]
    lines = [f"Base recipe: `{base}`", "",
             "| run | change | validation top-1 | vs base | pretraining s |",
             "| --- | --- | ---: | ---: | ---: |"]
    for _, name, change in candidates:
        s = scores[name]
        gain = s["top1"] - base_top1
        lines.append(f"| {name} | `{shlex.join(change)}` | {s['top1']:.2f} | {gain:+.2f} | "
                     f"{s['pretrain_seconds']:.0f} |")
    lines += ["", f"Chosen: **{chosen[1]}** (`{shlex.join(chosen[2])}`)."]
    # a run and its second seed (the base and "seed 1"): the mean and the spread of the two
    pairs = {k: v for k, v in seed_groups(candidates, scores).items() if len(v) == 2}
    if pairs:
        means = ", ".join(f"{k} {statistics.mean(v):.2f} (+-{abs(v[0] - v[1]) / 2:.2f})"
                          for k, v in pairs.items())
        lines.append(f"Mean of seeds 0 and 1 (+- half their difference): {means}.")
    if "seed 1" in scores and any(n == "seed 1" for _, n, _ in candidates):
        noise = abs(scores["base"]["top1"] - scores["seed 1"]["top1"])
        lines.append(f"A change is adopted when its mean beats the base's two-seed mean by more "
                     f"than the base's two seeds differ ({noise:.2f} points).")
    if rates:
        speeds = ", ".join(f"{k.removeprefix('calibrate ')} {v:.0f}" for k, v in rates.items())
        lines.append(f"Speed of each architecture (img/s, all threads): {speeds}.")
    with open(os.path.join(out, f"search_{changes}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, f"search_{changes}.json"), "w") as f:
        json.dump({"base": base, "scores": {n: scores[n] for _, n, _ in candidates}, "rates": rates,
                   "candidates": [{"axis": a, "name": n, "change": c} for a, n, c in candidates],
                   "chosen": chosen[1]}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
