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
* A norm that fuses its activation (``frn``, ``evonorm``) is built with ``act=True``
  where a ReLU follows it, and the block then skips its own ReLU there: the block
  asks the layer (:func:`reslab.norms.norm_activates`).
* ``branch`` picks the residual branch of every block, for training without a norm:

  ============ ================================================================
  ``standard`` ``relu(f(x) + shortcut(x))`` (He et al. 2015)
  ``fixup``    Fixup (Zhang, Dauphin & Ma 2019, arXiv 1901.09321): a scalar bias
               before each conv and activation, a scalar multiplier at the end
               of the branch (parameters ``bias1a``, ``bias1b``, ..., ``scale``)
  ``skipinit`` SkipInit (De & Smith 2020, arXiv 2002.10444): ``relu(g * f(x) +
               shortcut(x))`` with a learnable scalar ``skipinit_gain``
  ``nf``       NF-ResNet (Brock, De & Smith 2021, arXiv 2101.08692): ``x + alpha *
               f(relu(x) / beta)``, pre-activation, every conv with Scaled Weight
               Standardization, ``beta`` the expected std of the block input
  ============ ================================================================

  The scalars are parameters of the blocks; ``branch="standard"`` adds none, so the
  ``state_dict`` of a standard ResNet is unchanged.  The init schemes ``fixup``,
  ``skipinit`` and ``nf`` (:mod:`reslab.normfree`) build the model with their branch
  and set these parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..convs import RELU_GAMMA, ScaledStdConv2d
from ..errors import SpecError, choices_error
from ..norms import NormFactory, build_norm, has_affine_weight, norm_activates, norm_factory
from . import _positive_int, register_model

STEMS = ("imagenet", "cifar")
SHORTCUTS = ("A", "B")
BRANCHES = ("standard", "fixup", "skipinit", "nf")
NF_ALPHA = 0.2  # Brock et al. 2021's residual scale alpha
IMAGENET_INPUT = (3, 224)  # (channels, side) the ImageNet family was designed for


def _scalar(value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((), float(value)))


def _check_branch(branch: str, alpha: float) -> str:
    if branch not in BRANCHES:
        raise choices_error("branch", branch, BRANCHES)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha <= 1):
        raise SpecError(f"NF-ResNet alpha must be in (0, 1], got {alpha!r}")
    return branch


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


class _ResidualBlock(nn.Module):
    """What BasicBlock and Bottleneck share: the branch variants and how the branch meets the shortcut.

    Subclasses build ``convs`` (the branch's convolutions in order) and ``norms`` (the
    norm after each) and call :meth:`_finish`.  The branch is
    ``conv1 -> bn1 -> relu -> ... -> conv_m -> bn_m``; the block returns
    ``relu(branch(x) + shortcut(x))`` (``branch="standard"``), with Fixup's scalar biases
    and multiplier, or SkipInit's gain, or NF-ResNet's pre-activation form
    ``x + alpha * branch(relu(x) / beta)`` without the final ReLU.
    """

    expansion = 1
    branch_kind = "standard"

    def _finish(self, convs: list[str], norms: list[str], branch: str, alpha: float, beta: float) -> None:
        self._convs, self._norms = convs, norms
        self.branch_kind = branch
        self.layers_per_branch = len(convs)
        if not self.residual and branch != "standard":
            raise SpecError(f"branch={branch!r} needs residual blocks; a plain net (residual=False) has no "
                            "residual branch to scale")
        # Inside the branch a ReLU follows every norm but the last, unless the norm activates;
        # in a plain block the last one is followed by the block's ReLU directly.
        for i, name in enumerate(norms[:-1]):
            if norm_activates(getattr(self, name)):
                self.add_module(f"act{i + 1}", nn.Identity())
        if not self.residual and norm_activates(getattr(self, norms[-1])):
            self.relu_out = nn.Identity()
        if branch == "fixup":
            # Zhang et al. 2019 Fig. 1: a bias before each conv and each activation, a
            # multiplier (1) and a bias at the end of the branch.  Registered in forward order.
            for i in range(len(convs)):
                self.register_parameter(f"bias{i + 1}a", _scalar(0.0))
                if i < len(convs) - 1:
                    self.register_parameter(f"bias{i + 1}b", _scalar(0.0))
            self.scale = _scalar(1.0)
            self.register_parameter(f"bias{len(convs)}b", _scalar(0.0))
        elif branch == "skipinit":
            self.skipinit_gain = _scalar(0.0)  # De & Smith 2020: 0, so the block starts as its shortcut
        elif branch == "nf":
            self.alpha, self.beta = float(alpha), float(beta)

    def _add(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``x`` plus the Fixup bias ``name``; ``x`` itself in every other branch."""
        return x + getattr(self, name) if self.branch_kind == "fixup" else x

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # (N, inplanes, H, W)
        """The residual branch as it reaches the addition (scalars applied); for NF, of ``relu(x) / beta``."""
        out = x
        last = len(self._convs) - 1
        for i, (conv, norm) in enumerate(zip(self._convs, self._norms, strict=True)):
            out = getattr(self, norm)(getattr(self, conv)(self._add(out, f"bias{i + 1}a")))
            if i < last:
                act = getattr(self, f"act{i + 1}", self.relu)
                out = act(self._add(out, f"bias{i + 1}b"))
        if self.branch_kind == "fixup":
            return out * self.scale + getattr(self, f"bias{last + 1}b")
        if self.branch_kind == "skipinit":
            return out * self.skipinit_gain
        if self.branch_kind == "nf":
            return out * self.alpha
        return out

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:  # (N, inplanes, H, W)
        """What the branch is added to: the input, or its projection / zero-padding.  In an
        NF block a projection takes ``relu(x) / beta``, which resets the signal's variance."""
        if self.downsample is None:
            return x
        if self.branch_kind == "nf":
            return self.downsample(self._nf_input(x))
        return self.downsample(self._add(x, "bias1a"))  # Fixup's shortcut sees the biased input too

    def _nf_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x) / self.beta

    def zero_init_last(self) -> bool:
        """Zero the residual branch's last norm scale, so the block starts as the identity.

        Goyal et al. 2017 (arXiv 1706.02677, Sec. 5.1).  A no-op for plain blocks,
        whose only path is the branch: zeroing it would cut the signal.  True if a
        scale was zeroed.
        """
        return self.residual and _zero_weight(getattr(self, self._norms[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, inplanes, H, W)
        if self.branch_kind == "nf":  # pre-activation: no ReLU after the addition
            pre = self._nf_input(x)
            return (x if self.downsample is None else self.downsample(pre)) + self.branch(pre)
        out = self.branch(x)
        if self.residual:
            out = out + self.shortcut(x)
        return getattr(self, "relu_out", self.relu)(out)

    def extra_repr(self) -> str:
        if self.branch_kind == "nf":
            return f"branch=nf, alpha={self.alpha:g}, beta={self.beta:.4g}"
        return "" if self.branch_kind == "standard" else f"branch={self.branch_kind}"


def _branch_conv(branch: str, gamma: float = RELU_GAMMA) -> Callable[..., nn.Conv2d]:
    """The conv class of a branch: Scaled WS for NF-ResNets, else a plain Conv2d without bias."""
    if branch == "nf":
        return lambda *args, **kwargs: ScaledStdConv2d(*args, bias=False, gamma=gamma, **kwargs)
    return lambda *args, **kwargs: nn.Conv2d(*args, bias=False, **kwargs)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions, for ResNet-18/34 and the CIFAR nets (He et al. 2015 Fig. 2).

    ``downsample`` maps the input onto the output's shape where they differ
    (a projection or :class:`ZeroPadShortcut`); ``residual=False`` drops the
    shortcut altogether, giving the plain nets of He et al. Fig. 6.  ``branch``,
    ``alpha`` and ``beta``: see the module docstring.
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
        branch: str = "standard",
        alpha: float = NF_ALPHA,
        beta: float = 1.0,
    ):
        super().__init__()
        norm_layer = norm_layer or norm_factory("bn")
        conv = _branch_conv(_check_branch(branch, alpha))
        self.residual = residual
        self.conv1 = conv(inplanes, planes, kernel_size=3, stride=stride, padding=1)
        self.bn1 = build_norm(norm_layer, planes, act=True)
        self.relu = nn.ReLU()
        self.conv2 = conv(planes, planes, kernel_size=3, padding=1)
        # A plain block's ReLU follows bn2 directly; a residual block adds the shortcut first.
        self.bn2 = build_norm(norm_layer, planes, act=not residual)
        self.downsample = downsample
        self.stride = stride
        self._finish(["conv1", "conv2"], ["bn1", "bn2"], branch, alpha, beta)


class Bottleneck(_ResidualBlock):
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
        branch: str = "standard",
        alpha: float = NF_ALPHA,
        beta: float = 1.0,
    ):
        super().__init__()
        norm_layer = norm_layer or norm_factory("bn")
        conv = _branch_conv(_check_branch(branch, alpha))
        self.residual = residual
        self.conv1 = conv(inplanes, planes, kernel_size=1)
        self.bn1 = build_norm(norm_layer, planes, act=True)
        self.conv2 = conv(planes, planes, kernel_size=3, stride=stride, padding=1)
        self.bn2 = build_norm(norm_layer, planes, act=True)
        self.conv3 = conv(planes, planes * self.expansion, kernel_size=1)
        self.bn3 = build_norm(norm_layer, planes * self.expansion, act=not residual)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride
        self._finish(["conv1", "conv2", "conv3"], ["bn1", "bn2", "bn3"], branch, alpha, beta)


Block = type[BasicBlock] | type[Bottleneck]


def _check_resnet_options(layers: Sequence[int], stem: str, shortcut: str, widths: Sequence[int],
                          zero_init_residual: bool, residual: bool, branch: str, alpha: float) -> str:
    """A one-line SpecError for a bad :class:`ResNet` argument; the shortcut kind, upper-cased."""
    _check_branch(branch, alpha)
    if branch != "standard" and not residual:
        raise SpecError(f"branch={branch!r} needs residual blocks; a plain net has no residual branch "
                        "(use a cifar_resnet* or resnet* model)")
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
    return shortcut


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
        branch: ``standard``, ``fixup``, ``skipinit`` or ``nf``: every block's residual
            branch (module docstring).  Fixup also adds the scalar biases ``bias1`` (after
            the stem conv) and ``bias2`` (before ``fc``).  ``nf`` builds every conv with
            Scaled WS, drops the stem's ReLU, ends the stages with a ReLU, and gives each
            block ``beta``: the expected std of its input, which grows as
            ``Var = 1 + k * alpha^2`` over the blocks since the last projection shortcut and
            resets to 1 after it (Brock, De & Smith 2021, Sec. 4).
        alpha: NF-ResNet's residual scale (0.2); used by ``branch="nf"`` only.
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
        branch: str = "standard",
        alpha: float = NF_ALPHA,
    ):
        super().__init__()
        shortcut = _check_resnet_options(layers, stem, shortcut, widths, zero_init_residual, residual, branch, alpha)
        norm_layer = norm if callable(norm) else norm_factory(norm)
        self.stem_kind = stem
        self.shortcut_kind = shortcut
        self.residual = residual
        self.branch = branch
        self._make_stem(in_channels, widths[0], norm_layer)
        # Stages layer1, layer2, ...: torchvision's names.
        self.stage_names: list[str] = []
        inplanes = self._make_stages(block, layers, widths, norm_layer, alpha)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes
        if branch == "fixup":
            self.bias2 = _scalar(0.0)  # Zhang et al. 2019: before the classifier
        # Recorded on the model, so ``init_weights`` (which sets every norm scale) keeps
        # these scales at zero instead of undoing them.
        self.zero_init_residual = bool(zero_init_residual)
        if zero_init_residual:
            self._zero_init_residual()

    def _make_stem(self, in_channels: int, width: int, norm_layer: NormFactory) -> None:
        """``conv1``, ``maxpool``, ``bn1``, ``relu`` (and ``stem_act``, Fixup's ``bias1``) for ``self.stem_kind``."""
        nf = self.branch == "nf"
        # NF: Scaled WS with gamma 1 (its input is the data, not a ReLU's output)
        # and no activation: each NF block activates its own input.
        stem_conv = _branch_conv(self.branch, gamma=1.0)
        if self.stem_kind == "imagenet":
            self.conv1 = stem_conv(in_channels, width, kernel_size=7, stride=2, padding=3)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = stem_conv(in_channels, width, kernel_size=3, padding=1)
            self.maxpool = nn.Identity()
        with _located("bn1"):
            self.bn1 = build_norm(norm_layer, width, act=not nf)
        self.relu = nn.ReLU()
        if nf or norm_activates(self.bn1):
            self.stem_act = nn.Identity()
        if self.branch == "fixup":
            self.bias1 = _scalar(0.0)  # Zhang et al. 2019: after the stem conv, before its ReLU

    def _make_stages(self, block: Block, layers: Sequence[int], widths: Sequence[int], norm_layer: NormFactory,
                     alpha: float) -> int:
        """Add the stages ``layer1``, ``layer2``, ... to ``stage_names``; the channels the last one outputs.

        The first block of each stage after the first halves the resolution.
        """
        inplanes = widths[0]
        expected_var = 1.0  # NF: the variance of the next block's input, tracked analytically
        for index, (count, width) in enumerate(zip(layers, widths, strict=True)):
            name = f"layer{index + 1}"
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                with _located(f"{name}.{position}"):
                    downsample = self._make_shortcut(inplanes, width * block.expansion, stride, norm_layer)
                    blocks.append(block(inplanes, width, stride, downsample, norm_layer=norm_layer,
                                        residual=self.residual, branch=self.branch, alpha=alpha,
                                        beta=expected_var ** 0.5))
                if downsample is not None:
                    expected_var = 1.0  # the shortcut carried relu(x) / beta: variance reset
                expected_var += alpha**2
                inplanes = width * block.expansion
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        return inplanes

    def _zero_init_residual(self) -> None:
        """Goyal et al. 2017 (arXiv 1706.02677): each residual block starts as the identity."""
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
        # NF: the projection takes relu(x) / beta, so Scaled WS with the ReLU gain.
        conv = _branch_conv(self.branch)(inplanes, outplanes, kernel_size=1, stride=stride)
        return nn.Sequential(conv, build_norm(norm_layer, outplanes, act=False))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (N, C_in, H, W)
        """Stem and stages: the last feature map before pooling."""
        x = self.bn1(self.conv1(x))
        if self.branch == "fixup":
            x = x + self.bias1
        x = self.maxpool(getattr(self, "stem_act", self.relu)(x))  # (N, widths[0], H/4, W/4) imagenet; (.., H, W) cifar
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.branch == "nf":
            x = self.relu(x)  # pre-activation blocks leave the last addition un-activated
        return x  # (N, num_features, H', W')

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C_in, H, W)
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)  # (N, num_features)
        if self.branch == "fixup":
            x = x + self.bias2
        return self.fc(x)  # (N, num_classes)


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
def resnet18(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """ResNet-18: BasicBlock x (2, 2, 2, 2), ImageNet stem, widths 64..512 (torchvision names)."""
    return _imagenet_resnet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model(default_input=IMAGENET_INPUT)
def resnet34(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """ResNet-34: BasicBlock x (3, 4, 6, 3), ImageNet stem, widths 64..512 (torchvision names)."""
    return _imagenet_resnet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model(default_input=IMAGENET_INPUT)
def resnet50(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """ResNet-50: Bottleneck x (3, 4, 6, 3), ImageNet stem, widths 64..512 x4 (torchvision names)."""
    return _imagenet_resnet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model(default_input=IMAGENET_INPUT)
def resnet101(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """ResNet-101: Bottleneck x (3, 4, 23, 3), ImageNet stem, widths 64..512 x4 (torchvision names)."""
    return _imagenet_resnet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model(default_input=IMAGENET_INPUT)
def resnet152(*, num_classes, in_channels, norm, stem="imagenet", shortcut="B", width=64, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """ResNet-152: Bottleneck x (3, 8, 36, 3), ImageNet stem, widths 64..512 x4 (torchvision names)."""
    return _imagenet_resnet(Bottleneck, (3, 8, 36, 3), num_classes=num_classes, in_channels=in_channels, norm=norm,
                            stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model
def cifar_resnet20(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """CIFAR ResNet-20 (n=3, 0.27M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(20, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model
def cifar_resnet32(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """CIFAR ResNet-32 (n=5, 0.46M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(32, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model
def cifar_resnet44(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """CIFAR ResNet-44 (n=7, 0.66M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(44, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model
def cifar_resnet56(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """CIFAR ResNet-56 (n=9, 0.85M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(56, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


@register_model
def cifar_resnet110(*, num_classes, in_channels, norm, stem="cifar", shortcut="A", width=16, zero_init_residual=False,
              branch="standard", alpha=NF_ALPHA):
    """CIFAR ResNet-110 (n=18, 1.7M params, He et al. 2015 Table 6): widths 16/32/64, shortcut A."""
    return _cifar_resnet(110, num_classes=num_classes, in_channels=in_channels, norm=norm,
                         stem=stem, shortcut=shortcut, width=width, zero_init_residual=zero_init_residual,
                            branch=branch, alpha=alpha)


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
