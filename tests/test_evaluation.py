"""The evaluation protocols (linear, kNN, fine-tuning, label fractions) and the online probe of
train.py."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import eval_linear
import evaluation
import finetune
import train
from augment import ImageSpec
from conftest import write_idx
from model import SimCLR

TINY = ["--dataset", "fashion-mnist", "--arch", "resnet18", "--width", "0.125",
        "--batch-size", "16", "--amp", "off", "--no-download", "--no-aug-compile",
        "--log-every", "1"]


def test_knn_on_separable_features_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 10
    ytr, yte = torch.arange(200) % 4, torch.arange(40) % 4
    xtr = centres[ytr] + torch.randn(200, 16, generator=g) * 0.1
    xte = centres[yte] + torch.randn(40, 16, generator=g) * 0.1
    scores = evaluation.knn_predict(xtr, ytr, xte, 4, k=20)
    assert (scores.argmax(1) == yte).all()


@pytest.mark.parametrize("fraction,per_class", [(0.01, 1), (0.1, 6), (0.5, 30), (1.0, 60)])
def test_label_fraction_subsets_are_class_balanced(fraction, per_class):
    labels = torch.arange(600) % 10
    idx = evaluation.balanced_subset(labels, fraction, seed=0)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
    assert len(idx.unique()) == len(idx)
    assert torch.equal(idx, evaluation.balanced_subset(labels, fraction, seed=0))  # fixed seed


def test_logistic_regression_chooses_weight_decay_on_held_out_training_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = (x[:, 0] > 0).long()
    grid = eval_linear.get_args_parser().parse_args([]).weight_decay
    # the test labels are not even an argument
    logits, wd = eval_linear.linear_probe(x, y, x[:50], 2, grid)
    # separable data: every decay scores 100% on the held-out images and a tie goes to the strongest
    # decay (the simplest model); a choice made on the training fit itself would take the weakest
    # (its loss is lowest)
    assert (wd == max(eval_linear.WEIGHT_DECAYS)
            and (logits.argmax(1) == y[:50]).float().mean() > 0.95)
    one = eval_linear.get_args_parser().parse_args(["--weight-decay", "0.5"]).weight_decay
    assert eval_linear.linear_probe(x, y, x[:50], 2, one)[1] == 0.5


def test_warm_started_path_chooses_the_weight_decay_of_converged_fits():
    """The 50-iteration warm-started path ranks the decays as independent fits run to convergence
    do, on a problem where the choice matters (few noisy samples, many useless features)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 150, generator=g)
    y = ((x[:, 0] + x[:, 1] + torch.randn(200, generator=g)) > 0).long()
    args = eval_linear.get_args_parser().parse_args([])
    chosen = eval_linear.linear_probe(x, y, x[:10], 2, args.weight_decay, args.seed)[1]
    xs = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(args.seed))
    val, fit = perm[:20], perm[20:]
    decays = sorted(eval_linear.WEIGHT_DECAYS, reverse=True)
    scores = []
    for wd in decays:
        clf = eval_linear.fit_logistic(xs[fit], y[fit], 2, wd, max_iter=2000)
        scores.append((clf(xs[val]).argmax(1) == y[val]).float().mean().item())
    # the decay matters here (2 iterations per decay choose another one)
    assert len(set(scores)) > 1
    assert chosen == decays[max(range(len(decays)), key=lambda i: (scores[i], -i))]


def test_features_follow_the_autocast_dtype():
    torch.manual_seed(0)
    encoder = SimCLR("resnet18", cifar_stem=True, width=0.25).encoder.eval()
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    view = ImageSpec(28, (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        f32 = evaluation.features(encoder, images, view, torch.device("cpu"))
        bf16 = evaluation.features(encoder, images, view, torch.device("cpu"), dtype=torch.bfloat16)
    assert f32.dtype == bf16.dtype == torch.float32 and not torch.equal(f32, bf16)
    assert torch.nn.functional.cosine_similarity(f32, bf16).min() > 0.99


@pytest.fixture
def pretrained(tmp_path):
    data = str(write_idx(tmp_path / "fm", n_train=60, n_test=20))
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(
        TINY + ["--data-dir", data, "--output-dir", str(out), "--max-steps", "3", "--probe"]))
    return data, out


def test_online_probe_learns_and_the_knn_monitor_beats_chance(tmp_path):
    """60 training steps (2-4 s on 2 idle cores): the online probe is an AdamW at lr 1e-3 on
    detached features, which needs tens of steps to learn. conftest's images set the mean
    brightness by the class, so even a random encoder's features separate the 10 classes; without
    colour jitter (which scales the brightness by up to 1.8x) the views keep it. The probe's logged
    top-1 on the training views rises from chance (10%) to well above it, and kNN (train.py
    --probe) finds the class of test images."""
    data = str(write_idx(tmp_path / "fm", n_train=160, n_test=40))  # 10 steps per epoch
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(
        TINY + ["--data-dir", data, "--output-dir", str(out), "--max-steps", "60",
                "--log-every", "10", "--probe", "--jitter-p", "0", "--stem-stride", "2"]))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    probe = [r["probe_top1"] for r in rows if "loss" in r]
    assert all(0 <= p <= 100 for p in probe)
    assert len(probe) == 6  # steps 10, 20, ..., 60
    # Steps 31-60: 960 predictions, measured 31-39% a row (first row 7-9%), and 31-38% with
    # --seed 1. A probe that learns nothing scores ~10%, binomial std 1%: 20% is 10 std above it,
    # and 10 points below what it learns, room for another CPU's rounding to shift the seeded run
    # (its trajectory, not how fast a probe learns brightness)
    later = sum(probe[3:]) / 3
    assert later > 20 and later > probe[0] + 10, probe
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    # 40 test images: chance is 4 right (std 1.9); measured 85-100%
    assert len(knn) == 6 and min(knn) > 50, knn
    assert "probe" in torch.load(out / "last.pt", weights_only=True)


def test_online_probe_leaves_the_encoder_gradients_unchanged():
    torch.manual_seed(0)
    views, labels = torch.randn(16, 3, 16, 16), torch.tensor([0, 1, -1, 3, 4, 5, 6, 7])
    results = []
    for use_probe in (False, True):
        torch.manual_seed(1)
        model = SimCLR("resnet18", proj_dim=16, cifar_stem=True, width=0.125)
        args = train.get_args_parser().parse_args(["--lr", "0.3", "--temperature", "0.5"])
        opt = train.build_optimizer(model, args, 0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        probe = None
        if use_probe:
            probe = evaluation.OnlineProbe(model.feat_dim, 10, torch.device("cpu"))
        _, h, _ = train.train_step(model, views, opt, scaler, None, args)
        if probe is not None:  # as the loop does after each step
            probe.step(h, torch.cat([labels, labels]))
        results.append(({k: p.grad.clone() for k, p in model.named_parameters()},
                        model.state_dict()))
        if probe is not None:
            # the -1 label skipped twice
            assert probe.head.weight.grad is not None and probe.seen.item() == 14
    (g0, s0), (g1, s1) = results
    assert all(torch.equal(g0[k], g1[k]) for k in g0) and all(torch.equal(s0[k], s1[k]) for k in s0)


def test_headline_reports_each_protocol_at_its_own_fraction():
    """make demo's summary line: the linear probe on all labels, fine-tuning on 10% only; each
    protocol's headline is its own row (1.0 where it ran there, else its first fraction)."""
    def row(encoder, protocol, fraction, top1):
        return {"encoder": encoder, "protocol": protocol, "label_fraction": fraction, "top1": top1}
    rows = [row("simclr", "linear", 0.1, 80.0), row("simclr", "linear", 1.0, 88.0),
            row("random", "linear", 1.0, 81.0), row("simclr", "finetune", 0.1, 79.0),
            row("random", "finetune", 0.1, 66.0), row("simclr", "knn", 0.5, 70.0)]
    assert evaluation.headline(rows) == {"simclr_top1": 88.0, "random_top1": 81.0,
                                         "simclr_finetune_top1": 79.0,
                                         "random_finetune_top1": 66.0, "simclr_knn_top1": 70.0}


def test_protocols_fractions_plots_and_json(pretrained, capsys, tmp_path):
    """eval_linear.py (linear, kNN, three encoders, two fractions), then finetune.py on the same
    checkpoint: one results file and one summary line with every number, the table, the plots."""
    data, out = pretrained
    capsys.readouterr()
    eval_linear.main(eval_linear.get_args_parser().parse_args(
        ["--ckpt", str(out / "last.pt"), "--random-init", "--pixels", "--data-dir", data,
         "--protocol", "linear", "knn", "--label-fraction", "0.5", "1.0",
         "--weight-decay", "1e-4", "1e-2", "--amp", "off"]))
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"simclr_top1", "random_top1", "pixels_top1", "seconds", "top1", "top5", "ckpt",
            "dataset"} <= set(result)
    assert any("simclr" in line and "linear" in line for line in lines)  # the table
    finetune.main(finetune.get_args_parser().parse_args(
        ["--ckpt", str(out / "last.pt"), "--random-init", "--data-dir", data,
         "--label-fraction", "0.5", "1.0", "--epochs", "2", "--amp", "off"]))
    lines = capsys.readouterr().out.strip().splitlines()
    merged = json.loads(lines[-1])
    # the linear numbers stay in the summary
    for key in ("simclr_top1", "random_top1", "pixels_top1"):
        assert merged[key] == result[key], key
    assert {"simclr_finetune_top1", "random_finetune_top1"} <= set(merged)
    rows = merged["results"]
    assert len([r for r in rows if r["protocol"] == "linear"]) == 3 * 2
    assert len([r for r in rows if r["protocol"] == "knn"]) == 3 * 2
    fine = [r for r in rows if r["protocol"] == "finetune"]
    # pixels are not fine-tuned
    assert len(fine) == 2 * 2 and all(len(r["curve"]) == 2 for r in fine)
    assert {r["train_samples"] for r in rows} == {30, 60}
    for name in ("ablation_fashion-mnist.png", "label_fractions_fashion-mnist.png",
                 "eval_fashion-mnist.json"):
        assert os.path.getsize(out / name) > 0
    # eval_linear.py's picture stays listed
    assert str(out / "neighbours_fashion-mnist.png") in merged["plots"]
    assert any("simclr" in line and "finetune" in line for line in lines)  # the table
    with open(out / "eval_fashion-mnist.json") as f:
        assert json.load(f) == merged


def test_fine_tuning_reports_its_last_epoch_not_its_best(pretrained, capsys, monkeypatch):
    """The paper reports fine-tuning after its last epoch: choosing the best epoch would choose on
    the evaluation images. train_net is replaced by one whose curve peaks in the middle (90% at
    epoch 2) and ends lower (50% at epoch 3), neither the first nor the best."""
    data, out = pretrained
    curve = {1: 20.0, 2: 90.0, 3: 50.0}

    def fake_train_net(net, images, loss_fn, data, args, device, epochs, lr):
        assert epochs == 3
        return dict(curve), torch.zeros(len(data.eval_labels), data.classes)
    monkeypatch.setattr(finetune, "train_net", fake_train_net)
    capsys.readouterr()
    result = finetune.main(finetune.get_args_parser().parse_args(
        ["--ckpt", str(out / "last.pt"), "--random-init", "--data-dir", data, "--epochs", "3",
         "--amp", "off"]))
    fine = [r for r in result["results"] if r["protocol"] == "finetune"]
    assert {r["encoder"] for r in fine} == {"simclr", "random"}
    for r in fine:
        assert r["top1"] == 50.0, r
        assert r["curve"] == [20.0, 90.0, 50.0] and r["curve_epochs"] == [1, 2, 3]
    # the summary line: fine-tuning, the only protocol here, is the headline
    assert result["simclr_top1"] == result["random_top1"] == result["top1"] == 50.0
    # the row alone: the best epoch first, the last lower
    held = SimpleNamespace(split="test", eval_labels=torch.arange(20) % 10)
    row = finetune.result_row("simclr", "finetune", 1.0, {1: 90.0, 2: 50.0},
                              torch.zeros(20, 10), held, 0.0)
    assert row["top1"] == 50.0 and row["curve"] == [90.0, 50.0]


def test_linear_evaluation_refuses_an_encoder_that_changed(pretrained, monkeypatch):
    """The frozen-encoder check can fail: a feature extractor that runs BN in train mode is
    caught."""
    data, out = pretrained
    real = evaluation.features

    def leaky(encoder, *a, **k):
        if encoder is not None:
            encoder.train()
            with torch.no_grad():
                encoder(torch.randn(4, 3, 28, 28))  # moves the BN running statistics
        return real(encoder, *a, **k)
    monkeypatch.setattr(evaluation, "features", leaky)
    with pytest.raises(AssertionError, match="encoder changed"):
        eval_linear.main(eval_linear.get_args_parser().parse_args(
            ["--ckpt", str(out / "last.pt"), "--data-dir", data]))


def test_eval_on_val_holds_out_training_images_and_never_reads_the_test_split(pretrained, capsys,
                                                                              monkeypatch):
    data, out = pretrained
    real = evaluation.get_dataset

    def no_test(name, root, split, **kw):
        assert split != "test", "the test split was opened"
        return real(name, root, split, **kw)
    monkeypatch.setattr(evaluation, "get_dataset", no_test)
    capsys.readouterr()
    common = ["--ckpt", str(out / "last.pt"), "--random-init", "--data-dir", data,
              "--eval-on", "val", "--val-fraction", "0.2", "--amp", "off"]
    eval_linear.main(eval_linear.get_args_parser().parse_args(common))
    finetune.main(finetune.get_args_parser().parse_args(
        common + ["--epochs", "1", "--lr", "0.05", "0.1", "--lr-random", "0.2"]))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["eval_on"] == "val" and result["test_samples"] == 10
            and result["train_samples"] == 50)  # 1 in 6
    assert all(r["split"] == "val" for r in result["results"])
    assert {r["protocol"] for r in result["results"]} == {"linear", "finetune"}
    lrs = {(r["encoder"], r["lr"]) for r in result["results"] if r["protocol"] == "finetune"}
    # the random network's own rate
    assert lrs == {("simclr", 0.05), ("simclr", 0.1), ("random", 0.2)}
    assert os.path.exists(out / "eval_fashion-mnist_val.json")


def test_validation_images_are_class_balanced_fixed_and_apart_from_training(pretrained):
    data, _ = pretrained
    args = eval_linear.get_args_parser().parse_args(["--dataset", "fashion-mnist",
                                                     "--data-dir", data, "--eval-on", "val",
                                                     "--val-fraction", "0.2", "--seed", "5"])
    a = evaluation.load_data(args, {}, torch.device("cpu"))
    args.seed = 6  # another run's seed: the same validation images
    b = evaluation.load_data(args, {}, torch.device("cpu"))
    assert torch.equal(a.eval_images, b.eval_images)  # fixed by --val-seed, whatever --seed
    # round(0.2 x 6) of each class
    assert torch.bincount(a.eval_labels, minlength=10).tolist() == [1] * 10
    train_rows = {tuple(x.flatten().tolist()) for x in a.train_images}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in a.eval_images)
    assert len(a.train_labels) + len(a.eval_labels) == 60 and len(a.eval_labels) == 10


RESNET50 = dict(arch="resnet50", width=0.25, cifar_stem=True, stem_stride=1, proj_dim=128,
                proj_layers=2, init="official", dataset="fashion-mnist",
                image_size=28)


def test_fitted_bn_statistics_are_those_of_every_bn_input_over_all_images(tmp_path):
    """The fitted random baseline: every BN of the network normalises with the mean and variance of
    its inputs over all the training images, here 1100 of them in 3 batches of unequal size
    (512, 512, 76): BN's own cumulative average would weigh the small batch like the others, and
    miss the spread between batches."""
    data = str(write_idx(tmp_path / "fm", n_train=1100, n_test=20))
    args = eval_linear.get_args_parser().parse_args(["--dataset", "fashion-mnist",
                                                     "--data-dir", data])
    d = evaluation.load_data(args, RESNET50, torch.device("cpu"))
    model = evaluation.random_network(RESNET50, seed=0, zero_init_residual=False)
    enc = evaluation.fit_bn_statistics(model.encoder, d.train_images, d.spec,
                                       torch.device("cpu"), None)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 53
    # the reference: the same pass in train mode, every BN's inputs kept, statistics over all of
    # them in float64
    ref = evaluation.random_network(RESNET50, seed=0, zero_init_residual=False).encoder
    inputs = {i: [] for i in range(len(bns))}
    ref_bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for i, bn in enumerate(ref_bns):
        bn.register_forward_pre_hook(
            lambda m, x, i=i: inputs[i].append(x[0].double().transpose(0, 1).flatten(1)))
    with torch.no_grad():
        for k in range(0, 1100, 512):
            ref.train()(d.spec.batch(d.train_images[k:k + 512]).contiguous(
                memory_format=torch.channels_last))
    for i, bn in enumerate(bns):
        x = torch.cat(inputs[i], dim=1)  # (C, all pixels of all images)
        # per-batch float32 statistics pooled in float64: ~1e-6 relative; 1e-4 leaves room for other
        # summation orders of the convolutions between the two passes
        torch.testing.assert_close(bn.running_mean.double(), x.mean(1), rtol=1e-4, atol=1e-5,
                                   msg=str(i))
        torch.testing.assert_close(bn.running_var.double(), x.var(1), rtol=1e-4, atol=1e-5,
                                   msg=str(i))
    assert not enc.training


def test_random_init_baseline_has_working_branches_and_estimated_bn_statistics(tmp_path):
    """The 'all branches' random networks: every residual branch outputs something (zero init leaves
    each block the identity), and with fitted BN no BN keeps the fresh variance 1."""
    data = str(write_idx(tmp_path / "fm", n_train=60, n_test=20))
    args = eval_linear.get_args_parser().parse_args(["--dataset", "fashion-mnist",
                                                     "--data-dir", data])
    model = evaluation.random_network(RESNET50, seed=0, zero_init_residual=False)
    d = evaluation.load_data(args, RESNET50, torch.device("cpu"))
    enc = evaluation.fit_bn_statistics(model.encoder, d.train_images, d.spec,
                                       torch.device("cpu"), None)
    outputs = []
    for block in (b for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4) for b in layer):
        block.bn3.register_forward_hook(lambda m, i, o: outputs.append(o.abs().max().item()))
    with torch.no_grad():
        enc(d.spec.batch(d.train_images))
    assert len(outputs) == 16 and min(outputs) > 0
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)


# The held-out scores given by hand to the random variants, in RANDOM_VARIANTS' order, and the
# variant that must be reported: the best, not the first listed; a tie goes to the first listed.
VARIANT_SCORES = {
    "best third": ([30.0, 45.0, 80.0, 60.0], "zero-init branches, fitted BN"),
    "tie second and third": ([50.0, 70.0, 70.0, 20.0], "all branches, fresh BN"),
}


@pytest.mark.parametrize("case", list(VARIANT_SCORES))
def test_the_reported_random_network_is_the_best_variant_on_held_out_training_images(
        pretrained, capsys, monkeypatch, case):
    """eval_linear.py --random-init scores each random variant by a probe fitted on 80% of a sample
    of training images and scored on the other 20%, never on the evaluation images, and reports the
    best by name. The held-out scores are given by hand (each variant's probe logits scored as
    written here), so the expected name is written literally, not found by the code's own max."""
    data, out = pretrained
    written, expected = VARIANT_SCORES[case]
    seen = []
    selection = []  # (logits the variant's probe returned, its hand-written score)
    real_probe, real_topk = eval_linear.linear_probe, evaluation.topk

    def spy(xtr, ytr, xte, classes, weight_decays, *a, **k):
        seen.append(len(xte))
        if len(xte) != 12:
            return real_probe(xtr, ytr, xte, classes, weight_decays, *a, **k)
        # a variant's held-out images (20% of the 60 training images): its score is written above,
        # so its probe need not be fitted
        logits = torch.zeros(len(xte), classes)
        selection.append((logits, written[len(selection)]))
        return logits, weight_decays[0]

    def scored(logits, y, k):
        for t, score in selection:
            if t is logits:
                return score
        return real_topk(logits, y, k)
    monkeypatch.setattr(eval_linear, "linear_probe", spy)
    monkeypatch.setattr(evaluation, "topk", scored)
    capsys.readouterr()
    result = eval_linear.main(eval_linear.get_args_parser().parse_args(
        ["--ckpt", str(out / "last.pt"), "--random-init", "--data-dir", data, "--amp", "off",
         "--neighbours", "0"]))
    random_row = next(r for r in result["results"] if r["encoder"] == "random")
    scores = random_row["variant_scores"]
    assert set(scores) == set(eval_linear.RANDOM_VARIANTS)
    assert list(scores.values()) == written  # each variant got its score, in the listed order
    assert random_row["variant"] == expected
    assert result["random_top1"] == random_row["top1"]
    # the four variants scored on 20% of the 60 training images, not the 20 test
    assert seen[1:5] == [12] * 4 and len(selection) == 4
    printed = capsys.readouterr().out
    assert f"; reported: {expected}\n" in printed
    assert any(line.startswith(f"random ({expected})") for line in printed.splitlines())  # table


def test_nearest_neighbours_are_the_most_cosine_similar(tmp_path):
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(50, 6, generator=g), torch.randn(3, 6, generator=g)
    got = eval_linear.nearest(train, queries, k=4)
    for q, row in zip(queries.double(), got):  # float64, one by one
        sims = [(q @ t / (q.norm() * t.norm())).item() for t in train.double()]
        assert row.tolist() == sorted(range(50), key=lambda i: -sims[i])[:4]


def test_h_and_z_and_the_neighbours_picture(pretrained, capsys):
    """--head-layers 0 1 2: the probe on h, after the head's first layer and on z (the default head
    has 2); the headline simclr_top1 stays h's; neighbours_DATASET.png has a panel per encoder,
    its 28 px images at 84 px."""
    from PIL import Image
    data, out = pretrained
    capsys.readouterr()
    result = eval_linear.main(eval_linear.get_args_parser().parse_args(
        ["--ckpt", str(out / "last.pt"), "--random-init", "--pixels", "--data-dir", data,
         "--amp", "off", "--head-layers", "0", "1", "2", "--neighbours", "4"]))
    simclr = [r for r in result["results"] if r["encoder"] == "simclr"]
    assert [r.get("head_layers", 0) for r in simclr] == [0, 1, 2]
    assert result["simclr_top1"] == simclr[0]["top1"]
    # h only for the rest
    assert {r["encoder"] for r in result["results"] if r.get("head_layers")} == {"simclr"}
    path = out / "neighbours_fashion-mnist.png"
    assert str(path) in result["plots"]
    width, height = Image.open(path).size
    # 3 panels of 9 tiles of 84 + 6 px (and a 2 px grid) side by side, 4 rows high
    assert width >= 3 * 9 * 90 and height >= 4 * 90
    err = capsys.readouterr().err
    assert "Traceback" not in err
