import pytest
import torch
import torch.nn as nn
import torchvision

from model import SimCLR, build_encoder


@pytest.fixture(autouse=True)
def seeded():
    """The weights are initialised from torch's global generator, and so are the inputs below."""
    torch.manual_seed(0)


@pytest.mark.parametrize("arch,feat", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("cifar_stem,size", [(False, 64), (True, 32)])
def test_shapes(arch, feat, cifar_stem, size):
    m = SimCLR(arch, proj_dim=64, cifar_stem=cifar_stem)
    h, z = m(torch.randn(3, 3, size, size))
    assert h.shape == (3, feat) and z.shape == (3, 64)
    assert isinstance(m.encoder.fc, nn.Identity)
    if cifar_stem:
        assert m.encoder.conv1.kernel_size == (3, 3) and m.encoder.conv1.stride == (1, 1)
        assert isinstance(m.encoder.maxpool, nn.Identity)
    else:
        assert m.encoder.conv1.kernel_size == (7, 7) and isinstance(m.encoder.maxpool, nn.MaxPool2d)


def test_encoder_loads_strictly_into_torchvision_resnet18():
    m = SimCLR("resnet18")
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(m.encoder.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    m.eval(), net.eval()
    torch.testing.assert_close(net(x), m(x)[0])


def test_cifar_stem_encoder_loads_after_the_same_stem_swap():
    m = SimCLR("resnet18", cifar_stem=True)
    net = torchvision.models.resnet18()
    net.fc, net.maxpool = nn.Identity(), nn.Identity()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.load_state_dict(m.encoder.state_dict(), strict=True)


@pytest.mark.parametrize("arch,width,feat", [("resnet18", 0.25, 128), ("resnet18", 2.0, 1024),
                                             ("resnet50", 0.5, 1024)])
def test_width_multiplier(arch, width, feat):
    enc, d = build_encoder(arch, cifar_stem=True, width=width)
    assert d == feat
    assert enc(torch.randn(2, 3, 16, 16)).shape == (2, feat)
    full, _ = build_encoder(arch, cifar_stem=True)
    assert set(enc.state_dict()) == set(full.state_dict())  # same module names as torchvision's
    n, n_full = sum(p.numel() for p in enc.parameters()), sum(p.numel() for p in full.parameters())
    # conv weights scale as width^2, the stem's 3 input channels and BN weights as
    # width: <= 0.3% off here -> 1%
    assert n == pytest.approx(n_full * width ** 2, rel=0.01)


def test_residual_branches_start_at_zero():
    enc, _ = build_encoder("resnet18", width=0.5)
    assert all(not b.bn2.weight.any() for layer in (enc.layer1, enc.layer4) for b in layer)
    assert enc.bn1.weight.all()


def test_projection_head_dims():
    """The hidden layer keeps the encoder's width, the output is proj_dim (the layout:
    tests/test_head.py)."""
    m = SimCLR("resnet18", proj_dim=128)
    assert m.projector.net[0].in_features == m.projector.net[0].out_features == 512
    assert m(torch.randn(2, 3, 64, 64))[1].shape == (2, 128)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        SimCLR("vgg11")


def test_conv_and_head_init_follow_the_official_code():
    """Every conv as TF's variance_scaling_initializer (google-research/simclr resnet.py): a normal
    truncated at two of its standard deviations, whose std is then sqrt(1 / fan_in) (torchvision's
    kaiming fan_out gives sqrt(2 / fan_out), 41% more for a square 3x3 conv); the head's dense
    layers N(0, 0.01) (model_util.py)."""
    m = SimCLR("resnet50", cifar_stem=True, width=0.5)
    convs = [c for c in m.encoder.modules() if isinstance(c, nn.Conv2d)]
    checked = 0
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        w = conv.weight.detach()
        assert w.abs().max() <= 2 * (1 / fan_in) ** 0.5 / 0.87962566 + 1e-6  # truncated at 2 sigma
        # the sample std is then within ~0.7% (1 / sqrt(2n)) of the true one: 5% is 7 sigma
        if w.numel() >= 10000:
            assert w.std().item() == pytest.approx((1 / fan_in) ** 0.5, rel=0.05)
            checked += 1
    assert checked >= 40
    for layer in (x for x in m.projector.net if isinstance(x, nn.Linear)):
        # 1024 x 1024 and 1024 x 128 samples: the sample std within 0.1%-0.2%; 2% leaves room
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.02)
