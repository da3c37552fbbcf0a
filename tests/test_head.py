"""The projection head against the official code's layout, a checkpoint's network rebuilt from its
args, the init's check, and the untrained network that the random-init baseline uses."""
import pytest
import torch
import torch.nn as nn

import harness
from model import ProjectionHead, SimCLR, build_encoder


def official_head(h, layers):
    """google-research/simclr model_util.projection_head, written out in float64: each layer is a
    dense layer without bias then BN over the batch (biased variance, eps 1e-5); hidden layers have
    BN's beta and a ReLU, the output layer BN's gamma only (center=False) and no ReLU. Weights are
    read from our module's layers in order."""
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    bns = [m for m in layers if isinstance(m, nn.BatchNorm1d)]
    x = h.double()
    for i, (lin, bn) in enumerate(zip(linears, bns)):
        assert lin.bias is None  # BN follows every dense layer: no bias
        x = x @ lin.weight.double().T  # (B, out)
        x = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
        if i < len(linears) - 1:
            x = torch.relu(x * bn.weight.double() + bn.bias.double())
    return x


@pytest.mark.parametrize("layers", [2, 3])
def test_head_is_the_official_layout(layers):
    torch.manual_seed(0)
    head = ProjectionHead(32, proj_dim=16, layers=layers).double()
    kinds = [type(m) for m in head.net]
    assert kinds == ([nn.Linear, nn.BatchNorm1d, nn.ReLU] * (layers - 1)
                     + [nn.Linear, nn.BatchNorm1d])
    assert all(m.bias is None for m in head.net if isinstance(m, nn.Linear))
    out_bn = head.net[-1]
    assert not out_bn.affine and head.scale.shape == (16,)  # gamma, no beta, on the output layer
    with torch.no_grad():
        head.scale.uniform_(0.5, 1.5)
        for m in head.net:
            if isinstance(m, nn.BatchNorm1d) and m.affine:
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    h = torch.randn(64, 32, dtype=torch.float64)
    ref = official_head(h, list(head.net)) * head.scale.double()
    # float64: the same ops, reordered
    torch.testing.assert_close(head.train()(h), ref, rtol=1e-10, atol=1e-10)


def test_from_args_rebuilds_a_checkpoints_network_and_guesses_nothing(tmp_path):
    torch.manual_seed(0)
    args = {"arch": "resnet18", "proj_dim": 16, "cifar_stem": True, "width": 0.125,
            "stem_stride": 2, "proj_layers": 3, "init": "official"}
    old = SimCLR.from_args(args)
    torch.save({"model": old.state_dict(), "args": args}, tmp_path / "run.pt")
    ckpt = harness.load_checkpoint(str(tmp_path / "run.pt"))
    new = SimCLR.from_args(ckpt["args"])
    new.load_state_dict(ckpt["model"])  # strict
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(new.eval()(x)[1], old.eval()(x)[1], rtol=0, atol=0)
    assert new.projector.layers == 3 and new.encoder.conv1.stride == (2, 2)
    for key in args:  # every key is required
        with pytest.raises(KeyError):
            SimCLR.from_args({k: v for k, v in args.items() if k != key})


@pytest.mark.parametrize("init", ["Official", "kaiming", None])
def test_an_unknown_init_is_one_clear_error(init):
    with pytest.raises(ValueError, match="unknown init .*official, torchvision"):
        SimCLR("resnet18", cifar_stem=True, width=0.125, init=init)
    with pytest.raises(ValueError, match="unknown init"):
        ProjectionHead(32, init=init)


def test_residual_branches_contribute_without_zero_init():
    """The random-init baseline's network: every residual branch's last BN starts at one, so every
    block adds something (with zero init each block is the identity and its branch outputs
    exactly 0)."""
    torch.manual_seed(0)
    for zero, expect in ((True, False), (False, True)):
        enc, _ = build_encoder("resnet50", cifar_stem=True, width=0.25, zero_init_residual=zero)
        outputs = []
        for block in (b for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4)
                      for b in layer):
            block.bn3.register_forward_hook(lambda m, i, o: outputs.append(o.abs().max().item()))
        enc.eval()(torch.randn(2, 3, 28, 28))
        assert len(outputs) == 16 and all((x > 0) == expect for x in outputs), (zero, outputs)
