"""Models the benchmarks share."""
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.short(x))


def resnet18_cifar(num_classes=10, width=64):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max pool), as in the CIFAR literature."""
    layers = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)]):
        for b in range(2):
            layers.append(BasicBlock(cin, width * mult, stride if b == 0 else 1))
            cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# The conv nets spectral normalization is trained on (written here with the public shapes; no
# code copied). Each builds the unnormalized model: the benchmark and tests normalize it.

class SNGANCritic(nn.Sequential):
    """The SNGAN CNN critic for 32x32 images (Miyato et al. 2018, table 3; mimicry's
    SNGAN "cnn" discriminator): 3x3/4x4 convs 64-64-128-128-256-256-512, LeakyReLU(0.1),
    a linear head on the 4x4x512 map. 8 normalized layers."""

    def __init__(self, ch=64):
        chans = [(3, ch, 3, 1), (ch, ch, 4, 2), (ch, 2 * ch, 3, 1), (2 * ch, 2 * ch, 4, 2),
                 (2 * ch, 4 * ch, 3, 1), (4 * ch, 4 * ch, 4, 2), (4 * ch, 8 * ch, 3, 1)]
        layers = []
        for cin, cout, k, s in chans:
            layers += [nn.Conv2d(cin, cout, k, s, padding=1), nn.LeakyReLU(0.1)]
        layers += [nn.Flatten(), nn.Linear(8 * ch * 4 * 4, 1)]
        super().__init__(*layers)


class DBlock(nn.Module):
    """A ResNet critic block (Miyato et al. 2018 / mimicry DBlock): relu-conv3x3-relu-conv3x3,
    2x2 average pool when downsampling, a 1x1 conv shortcut where shape changes.
    ``first``: the optimized first block (no leading ReLU; shortcut pools before its conv)."""

    def __init__(self, cin, cout, downsample, first=False):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.first, self.downsample = first, downsample
        self.sc = nn.Conv2d(cin, cout, 1) if (cin != cout or downsample) else None
        self.pool = nn.AvgPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = x if self.first else self.relu(x)
        h = self.c2(self.relu(self.c1(h)))
        if self.downsample:
            h = self.pool(h)
        s = x
        if self.first:
            s = self.sc(self.pool(x))
        elif self.sc is not None:
            s = self.sc(x)
            if self.downsample:
                s = self.pool(s)
        return h + s


class ResDiscriminator32(nn.Module):
    """The ResNet SNGAN critic for 32x32 (mimicry's SNGANDiscriminator32, ndf=128): an
    optimized block and three blocks at 128 channels (two downsampling), ReLU, global sum
    pool, a linear head. 10 normalized layers."""

    def __init__(self, ndf=128):
        super().__init__()
        self.blocks = nn.Sequential(DBlock(3, ndf, True, first=True), DBlock(ndf, ndf, True),
                                    DBlock(ndf, ndf, False), DBlock(ndf, ndf, False))
        self.relu = nn.ReLU()
        self.head = nn.Linear(ndf, 1)

    def forward(self, x):
        h = self.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.head(h)


class WideBasic(nn.Module):
    """A pre-activation wide block as in DUE's WideResNet: bn-relu-conv3x3-bn-relu-conv3x3
    (the second conv strided), a strided 1x1 conv shortcut where shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=False)
        self.sc = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) \
            if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(x))
        s = x if self.sc is None else self.sc(out)
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        return out + s


class WideResNet(nn.Module):
    """WideResNet-depth-k on 32x32 inputs as in DUE (van Amersfoort et al. 2021): a 3x3 stem
    of 16 channels, three groups of (depth-4)/6 blocks at 16k/32k/64k channels (strides
    1, 2, 2), bn-relu, 8x8 average pool, a linear classifier (dropout left out)."""

    def __init__(self, depth=10, k=2, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        blocks, cin = [], 16
        for w, stride in zip(widths, (1, 2, 2)):
            for b in range(n):
                blocks.append(WideBasic(cin, w, stride if b == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(8)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.linear(self.pool(out).flatten(1))


def wrn_10_2():
    return WideResNet(10, 2)


def wrn_16_4():
    return WideResNet(16, 4)
