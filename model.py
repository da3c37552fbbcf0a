"""SimCLR's network (arXiv 2002.05709): a torchvision ResNet encoder f(.) without its classifier and
an MLP projection head g(.), as google-research/simclr builds them."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

INITS = ("official", "torchvision")  # of the weights: see _init_conv and ProjectionHead
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "wide_resnet50_2", "wide_resnet101_2")


def small_stem(image_size):
    """Whether images of this side get the 3x3 stem without max-pool (the paper's CIFAR stem,
    appendix B.9; the official code's cifar_stem is for 32 px): train.py's choice, also for 33-64 px
    (STL-10 at 64 px, Tiny ImageNet), where the ImageNet stem's stride 4 would leave 2x2 maps."""
    return image_size <= 64


def check_init(init):
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")


def _init_conv(conv, init="official"):
    """init "official": the official code's conv init (TF's variance_scaling_initializer), a normal
    of std sqrt(1 / fan_in) truncated at two standard deviations (0.8796: the std of a unit normal
    truncated so). "torchvision": torchvision's ResNet init, kaiming_normal_ with fan_out."""
    check_init(init)
    if init == "torchvision":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        return conv
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    return conv


def _scaled(channels, width):
    return channels if channels == 3 else max(1, round(channels * width))  # the RGB input keeps 3


def scale_width(net, width, init="official"):
    """Multiply the channels of every conv/BN of a ResNet by `width` (the paper's width multiplier,
    1x/2x/4x; below 1x for cheap CPU runs). Module names and structure stay torchvision's."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d):
                conv = nn.Conv2d(_scaled(child.in_channels, width),
                                 _scaled(child.out_channels, width),
                                 child.kernel_size, child.stride, child.padding,
                                 groups=child.groups, bias=child.bias is not None)
                setattr(module, name, _init_conv(conv, init))
            elif isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.BatchNorm2d(_scaled(child.num_features, width)))
    return net


def build_encoder(arch="resnet18", cifar_stem=False, width=1.0, stem_stride=1,
                  zero_init_residual=True, init="official"):
    """A torchvision ResNet with `fc = nn.Identity()`; returns (encoder, feature dim). With
    zero_init_residual the last BN of each residual block starts at zero, as in the official SimCLR
    ResNet (init_zero): every block starts as the identity, which suits training but makes an
    untrained network's residual branches output nothing. stem_stride 2 makes the small stem a 3x3
    stride-2 conv: a quarter of the compute on 28-32 px images. init: the convs', see _init_conv."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if not width > 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    check_init(init)
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    if init == "official":  # torchvision initialised its convs with kaiming_normal_ (fan_out)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)
    if cifar_stem:  # small images: 3x3 conv and no max-pool (paper, appendix B.9)
        stem = nn.Conv2d(3, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        net.conv1 = _init_conv(stem, init)
        net.maxpool = nn.Identity()
    if width != 1.0:
        scale_width(net, width, init)
        feat_dim = _scaled(feat_dim, width)
        if zero_init_residual:  # the new BNs start at one: zero the last BN of each block again
            for m in net.modules():
                if isinstance(m, torchvision.models.resnet.Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, torchvision.models.resnet.BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
    return net, feat_dim


class ProjectionHead(nn.Module):
    """g(h), as the official code builds it (google-research/simclr, model_util.projection_head):
    `layers` linear layers without bias, each but the last followed by BN and ReLU, the last by a BN
    with a scale but no shift (center=False); BN removes a bias, so none is kept. The paper writes
    the same head as W2 ReLU(BN(W1 h)). layers 2 is SimCLR's head, 3 SimCLRv2's. init "official":
    the linear layers N(0, 0.01), as the official linear_layer; "torchvision": PyTorch's default,
    uniform within 1 / sqrt(fan_in)."""

    def __init__(self, in_dim, proj_dim=128, hidden_dim=None, layers=2, init="official"):
        super().__init__()
        check_init(init)
        dims = [in_dim] + [hidden_dim or in_dim] * (layers - 1) + [proj_dim]
        mods = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1], bias=False))
            if i < layers - 1:
                mods += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        mods.append(nn.BatchNorm1d(proj_dim, affine=False))
        self.net = nn.Sequential(*mods)
        for m in self.net if init == "official" else ():
            if isinstance(m, nn.Linear):  # the official linear_layer's init: N(0, 0.01)
                nn.init.normal_(m.weight, std=0.01)
        self.scale = nn.Parameter(torch.ones(proj_dim))  # the output BN's gamma (no beta)
        self.dims = dims  # dims[k]: the width after k layers
        self.layers = layers

    def first_layers(self, k):
        """The head's first k layers, each (linear, BN, ReLU), sharing their modules: SimCLRv2
        fine-tunes from the first layer of its 3-layer head (the official ft_proj_selector). k = 0
        is empty (from the encoder)."""
        if not 0 <= k < self.layers:
            raise ValueError(f"the head has {self.layers} layers: keep 0 to {self.layers - 1} of "
                             f"them, got {k}")
        return nn.Sequential(*self.net[:3 * k])

    def forward(self, h):
        return self.net(h) * self.scale  # (B, proj_dim)


class SimCLR(nn.Module):
    """forward(x) -> (h, z): h = f(x) the encoder features (512 for resnet18, 2048 for resnet50,
    times the width multiplier), z = g(h) the projection that the NT-Xent loss sees. Keep h for
    downstream tasks.

    cifar_stem: the stem. False (the default) is torchvision's ImageNet stem (7x7 stride-2 conv and
    max-pool), for images of about 96 px and up; for small images (CIFAR, Fashion-MNIST, up to
    64 px) pass cifar_stem=small_stem(image_size), as train.py does: a 3x3 conv of stride
    `stem_stride`, no max-pool."""

    def __init__(self, arch="resnet18", proj_dim=128, cifar_stem=False, width=1.0, hidden_dim=None,
                 stem_stride=1, proj_layers=2, zero_init_residual=True, init="official"):
        super().__init__()
        self.encoder, self.feat_dim = build_encoder(arch, cifar_stem, width, stem_stride,
                                                    zero_init_residual, init)
        self.projector = ProjectionHead(self.feat_dim, proj_dim, hidden_dim, proj_layers, init)

    @classmethod
    def from_args(cls, a, **kwargs):
        """The network of a train.py checkpoint's args (ckpt["args"], every key required)."""
        return cls(a["arch"], a["proj_dim"], a["cifar_stem"], a["width"],
                   stem_stride=a["stem_stride"], proj_layers=a["proj_layers"], init=a["init"],
                   **kwargs)

    def forward(self, x):
        """x: images (B, 3, S, S), or a list of such batches of different sides (multi-crop): each
        goes through the encoder as its own batch, so that its BN normalises each resolution on its
        own, and the head takes them all at once, as SwAV's multi-crop does. -> (h, z) of every row,
        in the order given."""
        if isinstance(x, (list, tuple)):
            h = torch.cat([self.encoder(part) for part in x])  # (sum of B, feat_dim)
        else:
            h = self.encoder(x)  # (B, feat_dim)
        z = self.projector(h)  # (B, proj_dim)
        return h, z


def param_groups(module, weight_decay):
    """Two optimiser groups for SGD-like optimisers: the weights, with `weight_decay`; biases and BN
    parameters (ndim <= 1) without it (the official code excludes them by name: the same set)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradient over ranks too (every rank's output uses
    every input)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the batch of every rank (the paper's global BN), in plain torch for any
    device: torch's SyncBatchNorm has GPU kernels only. Statistics are summed with a differentiable
    all_reduce, so gradients flow to every rank's inputs; outside training or torch.distributed it
    is ordinary BN. Same state_dict keys. The variance takes two passes (the global mean, then the
    squares about it): E[x^2] - E[x]^2 in float32 cancels catastrophically when the mean is large
    against the spread."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x):
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))  # every axis but the channels
        shape = [1, c] + [1] * (x.dim() - 2)  # (C,) -> (1, C, 1, 1)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.full((1,), x.numel() // c, dtype=xf.dtype, device=x.device)
        stats = AllReduceSum.apply(torch.cat([xf.sum(dims), count]))  # (C + 1,) summed over ranks
        n = stats[-1]
        mean = stats[:c] / n  # (C,)
        d = xf - mean.view(shape)
        var = AllReduceSum.apply((d * d).sum(dims)) / n  # (C,) biased: BN normalises with it
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                if m is None:  # a cumulative average, as torch's BN
                    m = 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                # running_var keeps the unbiased variance, as torch's BN
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        y = d * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_bn(module):
    """Every BatchNorm of `module` as a GlobalBatchNorm holding the same parameters and buffers."""
    is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
    if is_bn and not isinstance(module, GlobalBatchNorm):
        like = module.weight if module.affine else module.running_mean
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=like.device, dtype=like.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_global_bn(child))
    return module


if __name__ == "__main__":
    m = SimCLR()
    h, z = m(torch.randn(2, 3, 96, 96))
    print(h.shape, z.shape, sum(p.numel() for p in m.parameters()) / 1e6, "M parameters")
