"""SimCLRv2's semi-supervised steps (arXiv 2006.10029): fine-tuning from inside a 3-layer head, and
self-distillation on unlabelled images."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_linear
import finetune
import train
from augment import ImageSpec
from conftest import one_line_exit_2, write_idx
from evaluation import Labelled
from model import SimCLR

TINY = ["--dataset", "fashion-mnist", "--arch", "resnet18", "--width", "0.125",
        "--batch-size", "16", "--amp", "off", "--no-download", "--no-aug-compile",
        "--log-every", "1"]


def tiny_data(n=32, size=16, classes=4, seed=0):
    """The labelled images finetune.py's steps take, seeded random uint8 images."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    y = torch.arange(n) % classes
    return Labelled("tiny", "test", ImageSpec(size, (0.5,) * 3, (0.25,) * 3), classes, images, y,
                    images[:8], y[:8])


def ft_args(*extra):
    return finetune.get_args_parser().parse_args(["--amp", "off", "--batch-size", "8", *extra])


@pytest.mark.parametrize("k", [0, 1, 2])
def test_finetuning_from_head_layer_k_trains_the_encoder_k_head_layers_and_the_classifier(
        k, monkeypatch):
    torch.manual_seed(0)
    model = SimCLR("resnet18", proj_dim=8, cifar_stem=True, width=0.125, proj_layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimised = []

    class SpySGD(torch.optim.SGD):
        def __init__(self, groups, **kw):
            super().__init__(groups, **kw)
            optimised.extend(p for g in self.param_groups for p in g["params"])
    monkeypatch.setattr(finetune.torch.optim, "SGD", SpySGD)
    data = tiny_data()
    _, _, net = finetune.finetune(model, k, torch.arange(len(data.train_labels)), data, ft_args(),
                                  torch.device("cpu"), 1, 0.1)
    assert ({id(p) for p in optimised} == {id(p) for p in net.parameters()}
            and len(optimised) == len(list(net.parameters())))
    # the head's first k layers (linear, BN, ReLU: 3 modules each), none after them
    heads = {n.split(".")[1] for n in net.state_dict() if n.startswith("head.")}
    assert heads == {str(i) for i in range(3 * k) if i % 3 != 2}  # ReLUs hold no state
    assert ({n.split(".")[0] for n in net.state_dict()}
            == {"encoder", "classifier"} | ({"head"} if k else set()))
    assert net.classifier.in_features == model.projector.dims[k]
    fresh = finetune.supervised_net(model, k, 4).classifier  # official zero_init_logits_layer
    assert not fresh.weight.any() and not fresh.bias.any()
    kept = [p for p in model.projector.net[:3 * k].parameters()]
    assert all(any(q.shape == p.shape for q in net.head.parameters()) for p in kept)
    # the pretrained model is left as it was (fine-tuning trains copies)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # and the copies did move
    moved = net.head[0].weight if k else net.encoder.conv1.weight
    original = model.projector.net[0].weight if k else model.encoder.conv1.weight
    assert not torch.equal(moved.detach(), original.detach())


def test_head_layers_beyond_the_checkpoint_head_is_one_line(tmp_path, capsys):
    data = str(write_idx(tmp_path / "fm", n_train=40, n_test=10))
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(
        TINY + ["--data-dir", data, "--output-dir", str(out), "--max-steps", "1"]))
    capsys.readouterr()
    args = finetune.get_args_parser().parse_args(["--ckpt", str(out / "last.pt"),
                                                  "--head-layers", "2", "--data-dir", data])
    assert "--head-layers 2" in one_line_exit_2(capsys, lambda: finetune.main(args))


def test_distillation_loss_is_the_colabs_formula():
    """tau^2 x the cross-entropy of softmax(student / tau) to softmax(teacher / tau), written out in
    plain Python floats from exp and log: the cross-entropy is the KL divergence plus the teacher's
    entropy."""
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)

    def softmax(row, tau):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]
    for tau in (1.0, 2.0):
        total = 0.0
        for srow, trow in zip(s.tolist(), t.tolist()):
            p, q = softmax(trow, tau), softmax(srow, tau)
            kl = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
            entropy = -sum(pj * math.log(pj) for pj in p)
            total += kl + entropy
        ref = total / 5 * tau ** 2
        # distill_loss computes in float32: ~1e-7 relative per term over 7 classes -> 1e-6
        assert finetune.distill_loss(s, t, tau).item() == pytest.approx(ref, rel=1e-6)


def test_student_converges_to_a_known_linear_teacher():
    """A fixed linear teacher on the pixels; a linear student trained on its softened predictions
    alone matches them: the softmax outputs agree to within 0.05 on every image (they
    start ~0.3 apart)."""
    torch.manual_seed(0)
    data = tiny_data(n=64, size=4, classes=3)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    nn.init.normal_(teacher[1].weight, std=1.0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    args = ft_args("--distill-epochs", "150", "--crop-scale", "1", "1")

    def probs(net):
        x = (data.train_images.float() / 255 - 0.5) / 0.25
        with torch.no_grad():
            return F.softmax(net(x), 1)
    start = (probs(student) - probs(teacher)).abs().max()
    finetune.distill(teacher, student, torch.arange(0), data, args, torch.device("cpu"), lr=2.0)
    gap = (probs(student) - probs(teacher)).abs().max()
    assert start > 0.3 and gap < 0.05, (start, gap)


@pytest.mark.parametrize("alpha", ["1.0", "0.5"])
def test_distillation_never_reads_the_labels_of_unlabelled_images(alpha):
    data = tiny_data(n=32, size=8, classes=4)
    labelled = torch.arange(0, 32, 4)  # 8 labelled images

    def run(scramble):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        student = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
        y = data.train_labels.clone()
        if scramble:
            rest = torch.ones(32, dtype=torch.bool)
            rest[labelled] = False
            y[rest] = torch.randperm(int(rest.sum()),
                                     generator=torch.Generator().manual_seed(1)) % 4
        seen = Labelled(data.dataset, data.split, data.spec, data.classes, data.train_images, y,
                        data.eval_images, data.eval_labels)
        finetune.distill(teacher, student, labelled, seen,
                         ft_args("--distill-epochs", "2", "--distill-alpha", alpha),
                         torch.device("cpu"), 0.5)
        return student.state_dict()
    a, b = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_labelled_loss_joins_when_alpha_is_below_one():
    data = tiny_data(n=32, size=8, classes=4)
    results = []
    for alpha in ("1.0", "0.5"):
        torch.manual_seed(0)
        teacher, student = (nn.Sequential(nn.Flatten(), nn.Linear(192, 4)),
                            nn.Sequential(nn.Flatten(), nn.Linear(192, 4)))
        finetune.distill(teacher, student, torch.arange(8), data,
                         ft_args("--distill-epochs", "1", "--distill-alpha", alpha),
                         torch.device("cpu"), 0.5)
        results.append(student[1].weight.detach().clone())
    assert not torch.equal(*results)


def test_v2_protocols_end_to_end(tmp_path, capsys):
    """A 3-layer head pretrained for 3 steps; the linear probe, then fine-tuned from the encoder and
    from head layer 1 at two label fractions, distilled, against random init: one table, one JSON
    line with every number, the saved networks."""
    data = str(write_idx(tmp_path / "fm", n_train=80, n_test=20))
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(
        TINY + ["--data-dir", data, "--output-dir", str(out), "--max-steps", "3",
                "--proj-layers", "3"]))
    capsys.readouterr()
    common = ["--ckpt", str(out / "last.pt"), "--random-init", "--data-dir", data, "--amp", "off",
              "--label-fraction", "0.25", "0.5"]
    eval_linear.main(eval_linear.get_args_parser().parse_args(common + ["--weight-decay", "1e-3"]))
    finetune.main(finetune.get_args_parser().parse_args(
        common + ["--batch-size", "16", "--epochs", "2", "3", "--head-layers", "0", "1",
                  "--distill", "--distill-epochs", "1", "--save-finetuned"]))
    lines = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(lines[-1])["results"]
    stages = [(r["encoder"], r["protocol"], r.get("head_layers"), r["label_fraction"])
              for r in rows]
    for f in (0.25, 0.5):
        for stage in [("simclr", "linear", None), ("simclr", "finetune", 0),
                      ("simclr", "finetune", 1), ("simclr", "distill", 1),
                      ("random", "finetune", 0)]:
            assert stages.count(stage + (f,)) == 1, stage
    fine = [r for r in rows if r["protocol"] == "finetune"]
    assert all(r["curve_epochs"][-1] == (2 if r["label_fraction"] == 0.25 else 3) for r in fine)
    distilled = [r for r in rows if r["protocol"] == "distill"]
    assert all(r["train_samples"] == 80 and r["labelled"] == round(80 * r["label_fraction"])
               for r in distilled)
    assert all(not math.isnan(r["top1"]) for r in rows)
    saved = torch.load(out / "finetuned_simclr_0.25_head1_lr0.05.pt", weights_only=True)
    assert (saved["head_layers"] == 1
            and {k.split(".")[0] for k in saved["model"]} == {"encoder", "head", "classifier"})
    assert not any(k.startswith(("head.3", "head.4", "head.6", "head.7")) for k in saved["model"])
    assert (out / "distilled_simclr_0.5_head1_lr0.05.pt").exists()
    assert (out / "label_fractions_fashion-mnist.png").stat().st_size > 0
    assert (any("finetune head 1" in line for line in lines)
            and any("distill head 1" in line for line in lines))
