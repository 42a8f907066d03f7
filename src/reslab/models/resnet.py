"""ResNets with any norm, either stem and either shortcut (He et al. 2015, arXiv 1512.03385).

One :class:`ResNet` class covers the ImageNet family (``resnet18`` ... ``resnet152``),
the CIFAR family (``cifar_resnet20`` ... ``cifar_resnet110``, 6n+2 layers) and
their plain counterparts without shortcuts (``plain20`` ...; He et al. Fig. 6).

* The norm is a spec string resolved once, in :class:`ResNet`, into a
  ``num_channels -> nn.Module`` factory; blocks only call ``norm_layer(ch)``.
* With ``norm="bn"`` and the ImageNet stem, parameter and buffer names are
  torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
  ``fc``, ...), so a torchvision ``state_dict`` loads with ``strict=True``.
  The norm attributes are ``bn1``/``bn2``/``bn3`` whatever the norm kind.
* Construction uses each layer's own ``reset_parameters`` (norm weight 1, bias 0);
  initialization schemes are applied afterwards by ``reslab.inits.init_weights``.
* No in-place operations (``ReLU(inplace=False)``, ``out = out + identity``), so
  forward hooks used by the diagnostics see each module's true output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError, choices_error
from ..norms import NormFactory, has_affine_weight, norm_factory
from . import _positive_int, register_model

STEMS = ("imagenet", "cifar")
SHORTCUTS = ("A", "B")
IMAGENET_INPUT = (3, 224)  # (channels, side) the ImageNet family was designed for


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding; no bias, since a norm follows it."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution; no bias, since a norm follows it."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _zero_weight(norm: nn.Module) -> bool:
    """Zero a norm's scale; False for norms without one (norm="none" is an Identity)."""
    if not has_affine_weight(norm):
        return False
    nn.init.zeros_(norm.weight)
    return True


@contextmanager
def _located(where: str) -> Iterator[None]:
    """Add the module path to a SpecError raised while building it (e.g. a bad ``gn:G``)."""
    try:
        yield
    except SpecError as exc:
        raise SpecError(f"{exc} (in {where})") from None


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut, option A of He et al. 2015 (Sec. 4.2, CIFAR nets).

    Subsamples with the block's stride and pads the missing channels with zeros,
    so the identity path adds no parameters and no computation.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1):
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"a zero-padding shortcut cannot reduce {in_planes} channels to {out_planes}")
        self.stride = stride
        self.extra_channels = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C_in, H, W)
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C_in, ceil(H/s), ceil(W/s))
        # F.pad pads the last dims first: (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # (N, C_out, H/s, W/s)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, for ResNet-18/34 and the CIFAR nets (He et al. 2015 Fig. 2).

    ``downsample`` maps the input onto the output's shape where they differ
    (a projection or :class:`ZeroPadShortcut`); ``residual=False`` drops the
    shortcut altogether, giving the plain nets of He et al. Fig. 6.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormFactory | None = None,
        residual: bool = True,
    ):
        super().__init__()
        norm_layer = norm_layer or norm_factory("bn")
        self.residual = residual
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> bool:
        """Zero the residual branch's last norm scale, so the block starts as the identity.

        Goyal et al. 2017 (arXiv 1706.02677, Sec. 5.1).  A no-op for plain blocks,
        whose only path is the branch: zeroing it would cut the signal.  True if a
        scale was zeroed.
        """
        return self.residual and _zero_weight(self.bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, inplanes, H, W)
        out = self.relu(self.bn1(self.conv1(x)))  # (N, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (N, planes, H/s, W/s)
        if self.residual:
            identity = x if self.downsample is None else self.downsample(x)
            out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), for ResNet-50/101/152 (He et al. 2015 Fig. 5).

    The stride sits on the 3x3 convolution, as in torchvision's "ResNet v1.5"
    (https://catalog.ngc.nvidia.com/orgs/nvidia/resources/resnet_50_v1_5_for_pytorch),
    not on the first 1x1 as in the paper.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormFactory | None = None,
        residual: bool = True,
    ):
        super().__init__()
        norm_layer = norm_layer or norm_factory("bn")
        self.residual = residual
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> bool:
        """Zero ``bn3``'s scale (Goyal et al. 2017, arXiv 1706.02677); a no-op for plain blocks.
        True if a scale was zeroed."""
        return self.residual and _zero_weight(self.bn3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, inplanes, H, W)
        out = self.relu(self.bn1(self.conv1(x)))  # (N, planes, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (N, planes, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (N, 4 * planes, H/s, W/s)
        if self.residual:
            identity = x if self.downsample is None else self.downsample(x)
            out = out + identity
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A stem, ``len(layers)`` stages of residual blocks, global average pooling, a linear head.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: classifier outputs.
        in_channels: input image channels.
        norm: a norm spec (``bn``, ``gn:16``, ...) or an already resolved factory.
        stem: ``"imagenet"``: 7x7/2 conv + norm + ReLU + 3x3/2 max-pool (4x downsampling);
            ``"cifar"``: 3x3/1 conv + norm + ReLU (He et al. 2015 Sec. 4.2).
        shortcut: where a block changes shape, ``"A"`` zero-pads (parameter-free) and
            ``"B"`` projects with 1x1 conv + norm (He et al. 2015 Sec. 3.3); identity elsewhere.
        widths: base channels of each stage (a block's output is ``width * block.expansion``);
            the stem outputs ``widths[0]`` channels.  Stages after the first halve the resolution.
        zero_init_residual: call every block's ``zero_init_last()`` at construction, so each
            residual block starts as the identity (Goyal et al. 2017, arXiv 1706.02677).
        residual: ``False`` removes every shortcut: the plain nets of He et al. Fig. 6.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        norm: str | NormFactory = "bn",
        stem: str = "imagenet",
        shortcut: str = "B",
        widths: Sequence[int] = (64, 128, 256, 512),
        zero_init_residual: bool = False,
        residual: bool = True,
    ):
        super().__init__()
        if stem not in STEMS:
            raise choices_error("stem", stem, STEMS)
        shortcut = shortcut.upper() if isinstance(shortcut, str) else shortcut
        if shortcut not in SHORTCUTS:
            raise choices_error("shortcut", shortcut, SHORTCUTS)
        if len(layers) != len(widths) or not layers:
            raise SpecError(f"need one width per stage: layers={tuple(layers)}, widths={tuple(widths)}")
        for count in layers:
            _positive_int(count, "blocks per stage")
        for width in widths:
            _positive_int(width, "stage width")
        if zero_init_residual and not residual:
            raise SpecError("zero_init_residual=True needs residual blocks; a plain net has no branch to zero")

        norm_layer = norm if callable(norm) else norm_factory(norm)
        self.stem_kind = stem
        self.shortcut_kind = shortcut
        self.residual = residual

        # Stem.
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, widths[0])
            self.maxpool = nn.Identity()
        with _located("bn1"):
            self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU()

        # Stages layer1, layer2, ...: torchvision's names.  The first block of each
        # stage after the first halves the resolution.
        self.stage_names: list[str] = []
        inplanes = widths[0]
        for index, (count, width) in enumerate(zip(layers, widths)):
            name = f"layer{index + 1}"
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                with _located(f"{name}.{position}"):
                    downsample = self._make_shortcut(inplanes, width * block.expansion, stride, norm_layer)
                    blocks.append(block(inplanes, width, stride, downsample, norm_layer=norm_layer, residual=residual))
                inplanes = width * block.expansion
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes

        # Recorded on the model, so ``init_weights`` (which sets every norm scale) keeps
        # these scales at zero instead of undoing them.
        self.zero_init_residual = bool(zero_init_residual)
        if zero_init_residual:
            # Goyal et al. 2017 (arXiv 1706.02677): each residual block starts as the identity.
            zeroed = [module.zero_init_last() for module in self.modules() if hasattr(module, "zero_init_last")]
            if not any(zeroed):
                raise SpecError("zero_init_residual=True needs a norm with a scale at the end of each residual "
                                "branch; this norm has none (use bn, gn, ln, in or rms)")

    def _make_shortcut(self, inplanes: int, outplanes: int, stride: int, norm_layer: NormFactory) -> nn.Module | None:
        """The block's ``downsample``: None (identity) unless the shape changes."""
        if not self.residual or (stride == 1 and inplanes == outplanes):
            return None
        if self.shortcut_kind == "A":
            return ZeroPadShortcut(inplanes, outplanes, stride)
        return nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (N, C_in, H, W)
        """Stem and stages: the last feature map before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, widths[0], H/4, W/4) imagenet; (.., H, W) cifar
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x  # (N, num_features, H', W')

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C_in, H, W)
        x = self.avgpool(self.forward_features(x))  # (N, num_features, 1, 1)
        return self.fc(torch.flatten(x, 1))  # (N, num_classes)


# --- registered entry points -------------------------------------------------

def _imagenet_resnet(block: Block, layers: Sequence[int], *, width: int, **kwargs) -> ResNet:
    width = _positive_int(width, "width (channels of the first stage)")
    return ResNet(block, layers, widths=(width, 2 * width, 4 * width, 8 * width), **kwargs)


def _cifar_resnet(depth: int, *, width: int, **kwargs) -> ResNet:
    # He et al. 2015 Sec. 4.2: 3 stages of n BasicBlocks, 16/32/64 filters, 6n+2 weight layers.
    width = _positive_int(width, "width (channels of the first stage)")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, (n, n, n), widths=(width, 2 * width, 4 * width), **kwargs)


@register_model(default_input=IMAGENET_INPUT)
def resnet18(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False):
    """ResNet-18: BasicBlock x (2, 2, 2, 2), ImageNet stem, widths 64..512 (torchvision names)."""
    return _imagenet_resnet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model(default_input=IMAGENET_INPUT)
def resnet34(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False):
    """ResNet-34: BasicBlock x (3, 4, 6, 3), ImageNet stem, widths 64..512 (torchvision names)."""
    return _imagenet_resnet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model(default_input=IMAGENET_INPUT)
def resnet50(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False):
    """ResNet-50: Bottleneck x (3, 4, 6, 3), ImageNet stem, widths 64..512 x4 (torchvision names)."""
    return _imagenet_resnet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model(default_input=IMAGENET_INPUT)
def resnet101(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False):
    """ResNet-101: Bottleneck x (3, 4, 23, 3), ImageNet stem, widths 64..512 x4 (torchvision names)."""
    return _imagenet_resnet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model(default_input=IMAGENET_INPUT)
def resnet152(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False):
    """ResNet-152: Bottleneck x (3, 8, 36, 3), ImageNet stem, widths 64..512 x4 (torchvision names)."""
    return _imagenet_resnet(Bottleneck, (3, 8, 36, 3), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model
def cifar_resnet20(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False):
    """CIFAR ResNet-20 (n=3, 0.27M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(20, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model
def cifar_resnet32(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False):
    """CIFAR ResNet-32 (n=5, 0.46M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(32, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model
def cifar_resnet44(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False):
    """CIFAR ResNet-44 (n=7, 0.66M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(44, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model
def cifar_resnet56(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False):
    """CIFAR ResNet-56 (n=9, 0.85M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(56, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model
def cifar_resnet110(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False):
    """CIFAR ResNet-110 (n=18, 1.7M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(110, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual)


@register_model
def plain20(*, num_classes, in_channels, norm, stem="cifar", width=16):
    """Plain-20: cifar_resnet20 without shortcuts (He et al. 2015 Fig. 6)."""
    return _cifar_resnet(20, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, width=width, residual=False)


@register_model
def plain32(*, num_classes, in_channels, norm, stem="cifar", width=16):
    """Plain-32: cifar_resnet32 without shortcuts (He et al. 2015 Fig. 6)."""
    return _cifar_resnet(32, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, width=width, residual=False)


@register_model
def plain44(*, num_classes, in_channels, norm, stem="cifar", width=16):
    """Plain-44: cifar_resnet44 without shortcuts (He et al. 2015 Fig. 6)."""
    return _cifar_resnet(44, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, width=width, residual=False)


@register_model
def plain56(*, num_classes, in_channels, norm, stem="cifar", width=16):
    """Plain-56: cifar_resnet56 without shortcuts (He et al. 2015 Fig. 6)."""
    return _cifar_resnet(56, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, width=width, residual=False)


@register_model
def plain110(*, num_classes, in_channels, norm, stem="cifar", width=16):
    """Plain-110: cifar_resnet110 without shortcuts (He et al. 2015 Fig. 6)."""
    return _cifar_resnet(110, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, width=width, residual=False)
