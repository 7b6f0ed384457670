"""lipschitz_bound on models users train, written like the public ones: for each,
lower <= sampled local Jacobian norms <= upper, estimate <= upper, and for small models the
estimate is the exact product of per-layer norms. Widths are tiny to keep CI fast."""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipkern
from lipkern import ConvSpec
from lipkern.bound import local_lower_bound
from lipkern.reference import exact_sigma

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from models import resnet18_cifar  # noqa: E402

SN = torch.nn.utils.parametrizations.spectral_norm


def _bn_eval(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.normal_(generator=g)
    return model.eval()


def check(model, x, n_samples=2, iters=15, **kw):
    """The three numbers in order, against local Jacobian norms at fresh random points
    (power iteration from below: a few steps already test 'never above upper')."""
    r = lipkern.lipschitz_bound(model, x, inputs=x, generator=torch.Generator().manual_seed(0),
                                lower_iters=iters, **kw)
    up = float(r.upper)
    assert float(r.lower) <= up * (1 + 1e-5)
    assert float(r.estimate) <= up * (1 + 1e-5)
    for i in range(n_samples):
        s = float(local_lower_bound(model, torch.randn_like(x), n_iters=iters,
                                    generator=torch.Generator().manual_seed(i + 1)))
        assert 0 < s <= up * (1 + 1e-5), (s, up)
    for row in r.layers:
        assert float(row.upper) >= float(row.estimate) * (1 - 1e-6), row
    return r


# ---------------------------------------------------------------- ResNet-18
class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


class ResNet18ImageNet(nn.Module):
    """torchvision's resnet18 layout: 7x7/2 stem, 3x3/2 max pool, four stages, adaptive
    average pool, fc."""

    def __init__(self, width=4, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for mult, stride in [(1, 1), (2, 2), (4, 2), (8, 2)]:
            layers.append(nn.Sequential(Basic(cin, width * mult, stride),
                                        Basic(width * mult, width * mult, 1)))
            cin = width * mult
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_resnet18_cifar():
    torch.manual_seed(0)
    r = check(_bn_eval(resnet18_cifar(width=4)), torch.randn(1, 3, 32, 32), n_samples=1,
              iters=4, n_iters=20)
    assert len(r.fused_layers) == 22  # 20 convs, the pool, the fc


def test_resnet18_imagenet_shapes():
    torch.manual_seed(1)
    model = _bn_eval(ResNet18ImageNet(width=2))
    r = check(model, torch.randn(1, 3, 224, 224), n_samples=1, iters=2, n_iters=10)
    specs = [s for _, _, s in r.fused_layers]
    assert specs[0].input_size == (224, 224) and specs[1].input_size == (56, 56)


# ---------------------------------------------------------------- WideResNet
class WideBasic(nn.Module):
    def __init__(self, cin, cout, stride, p):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1)
        self.dropout = nn.Dropout(p)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride))

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


def wide_resnet(depth=10, k=1, p=0.3):
    n = (depth - 4) // 6
    widths = [4, 4 * k, 8 * k, 16 * k]
    layers, cin = [nn.Conv2d(3, widths[0], 3, 1, 1)], widths[0]
    for w, s in zip(widths[1:], (1, 2, 2)):
        for i in range(n):
            layers.append(WideBasic(cin, w, s if i == 0 else 1, p))
            cin = w
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def test_wide_resnet():
    torch.manual_seed(2)
    check(_bn_eval(wide_resnet()), torch.randn(1, 3, 16, 16), iters=6, n_iters=20)


# ---------------------------------------------------------------- SNGAN ResNet critic
class OptimizedDisBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.c1, self.c2 = SN(nn.Conv2d(cin, cout, 3, 1, 1)), SN(nn.Conv2d(cout, cout, 3, 1, 1))
        self.c_sc = SN(nn.Conv2d(cin, cout, 1, 1, 0))

    def forward(self, x):
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class DisBlock(nn.Module):
    def __init__(self, cin, cout, down):
        super().__init__()
        self.c1, self.c2 = SN(nn.Conv2d(cin, cout, 3, 1, 1)), SN(nn.Conv2d(cout, cout, 3, 1, 1))
        self.down = down
        self.c_sc = SN(nn.Conv2d(cin, cout, 1)) if cin != cout or down else None

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        sc = x
        if self.c_sc is not None:
            sc = self.c_sc(x)
        if self.down:
            h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)
        return h + sc


class SNGANCritic(nn.Module):
    def __init__(self, ch=4):
        super().__init__()
        self.blocks = nn.Sequential(OptimizedDisBlock(3, ch), DisBlock(ch, ch, True),
                                    DisBlock(ch, ch, False), DisBlock(ch, ch, False))
        self.l5 = SN(nn.Linear(ch, 1))

    def forward(self, x):
        h = F.relu(self.blocks(x))
        h = h.sum(dim=[2, 3])
        return self.l5(h)


def test_sngan_resnet_critic():
    torch.manual_seed(3)
    check(SNGANCritic().eval(), torch.randn(1, 3, 16, 16), iters=6, n_iters=30)


# ---------------------------------------------------------------- DCGAN critic, exact
class DCGANCritic(nn.Module):
    def __init__(self, nc=1, ndf=2):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False))

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


def test_dcgan_critic_estimate_is_the_exact_product():
    torch.manual_seed(4)
    m = _bn_eval(DCGANCritic())
    x = torch.randn(1, 1, 16, 16)
    r = check(m, x, n_iters=400)
    bn = m.main[3]
    want = (exact_sigma(m.main[0].weight, ConvSpec(16, stride=2, padding=1))
            * exact_sigma(m.main[2].weight, ConvSpec(8, stride=2, padding=1))
            * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max().double()
            * exact_sigma(m.main[5].weight, ConvSpec(4)))
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=1e-4, atol=0)
    assert float(r.upper) >= float(want)


# ---------------------------------------------------------------- invertible residual block
class IResBlock(nn.Module):
    """i-ResNet: x + g(x), g a spectrally normalized conv stack scaled by coeff < 1."""

    def __init__(self, c=3, hidden=6, coeff=0.9):
        super().__init__()
        self.g = nn.Sequential(SN(nn.Conv2d(c, hidden, 3, 1, 1)), nn.ELU(),
                               SN(nn.Conv2d(hidden, hidden, 1)), nn.ELU(),
                               SN(nn.Conv2d(hidden, c, 3, 1, 1)))
        self.coeff = coeff

    def forward(self, x):
        return x + self.coeff * self.g(x)


def test_invertible_residual_block():
    torch.manual_seed(5)
    m = IResBlock().eval()
    x = torch.randn(1, 3, 8, 8)
    r = check(m, x, n_iters=1500)
    g = [exact_sigma(m.g[0].weight, ConvSpec(8, padding=1)),
         exact_sigma(m.g[2].weight, ConvSpec(8)),
         exact_sigma(m.g[4].weight, ConvSpec(8, padding=1))]
    want = 1 + 0.9 * g[0] * g[1] * g[2]
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=1e-3, atol=0)
    assert float(r.upper) >= float(want)
