"""Non-residual baselines from the seed notes: a multilayer perceptron and a small CNN.

``mlp`` is the seeds' MNIST recipe for comparing initializations (784-256-128-10
with ReLU and dropout 0.2); ``simple_cnn`` is their small conv net (16/32/64
3x3 filters, two 2x2 max-pools, a 100-unit hidden layer) with a configurable
norm after each convolution and global average pooling in place of the fixed
7x7 flatten, so it runs on any input of at least 4x4.  A norm that fuses its
activation (``frn``, ``evonorm``) replaces the ReLU after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SpecError, choices_error
from ..norms import NormFactory, build_norm, norm_activates, norm_factory
from . import _coerce, _positive_int, register_model


def _size_pair(input_size: int | Sequence[int]) -> tuple[int, int]:
    """``28`` or ``(28, 28)`` -> ``(28, 28)``."""
    if isinstance(input_size, (int, str)):
        side = _positive_int(input_size, "input_size")
        return side, side
    if len(input_size) != 2:
        raise SpecError(f"input_size must be an int or (height, width), got {input_size!r}")
    return _positive_int(input_size[0], "input_size"), _positive_int(input_size[1], "input_size")


def _hidden_sizes(hidden: int | str | Sequence[int]) -> tuple[int, ...]:
    """``(256, 128)``, ``"256,128"`` or ``256`` -> a tuple of positive widths; ``""``/``()`` -> none."""
    if isinstance(hidden, str):
        pieces = [piece.strip() for piece in hidden.split(",") if piece.strip()]
        hidden = [_coerce(piece, 1, "a hidden size of mlp") for piece in pieces]
    elif isinstance(hidden, int):
        hidden = [hidden]
    return tuple(_positive_int(size, "every hidden size of mlp") for size in hidden)


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU -> Dropout`` per hidden layer, then a linear classifier.

    Args:
        in_features: values per sample after flattening (C * H * W).
        num_classes: classifier outputs.
        hidden: hidden layer widths; empty gives multinomial logistic regression.
        dropout: drop probability after each hidden layer (Srivastava et al. 2014).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.2):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise SpecError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        if x[0].numel() != self.in_features:
            raise ValueError(
                f"mlp was built for {self.in_features} values per sample (in_channels * H * W), "
                f"got input of shape {tuple(x.shape)}; pass the matching in_channels/input_size"
            )
        x = torch.flatten(x, 1)  # (N, C*H*W)
        return self.fc(self.features(x))  # (N, num_classes)


class SimpleCNN(nn.Module):
    """Three 3x3 conv-norm-ReLU layers with two max-pools and a 2-layer head: the seeds' MNIST CNN.

    Channels ``width, 2*width, 4*width`` (16/32/64 by default).  ``head="flatten"``
    (the default, as in the seeds) flattens the last ``4w x H/4 x W/4`` map (64x7x7 on
    28x28 MNIST) into the ``hidden``-unit layer, so the model is built for one input
    size; ``head="gap"`` global-average-pools first (Lin et al. 2013, arXiv 1312.4400),
    which makes the head independent of the input size but throws away where each
    feature is, and learns far more slowly on digits.

    Each norm is built with ``act=True`` (a ReLU follows it) where the factory takes
    ``act``; after a norm that then applies its own activation (``norm_activates``:
    FRN's TLU, EvoNorm-S0's gate) the model's ReLU is skipped, not applied twice.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str | NormFactory = "bn",
        width: int = 16,
        hidden: int = 100,
        head: str = "flatten",
        input_size: tuple[int, int] = (28, 28),
    ):
        super().__init__()
        if head not in SIMPLE_CNN_HEADS:
            raise choices_error("simple_cnn head", head, SIMPLE_CNN_HEADS)
        norm_layer = norm if callable(norm) else norm_factory(norm)
        c1, c2, c3 = width, 2 * width, 4 * width
        # Conv biases are dropped before a norm, as in the ResNets.
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1, bias=False)
        self.bn1 = build_norm(norm_layer, c1, act=True)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1, bias=False)
        self.bn2 = build_norm(norm_layer, c2, act=True)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, padding=1, bias=False)
        self.bn3 = build_norm(norm_layer, c3, act=True)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.head = head
        if head == "gap":
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d((1, 1))
            features = c3
        else:
            self.avgpool = nn.Identity()
            height, width_px = input_size
            features = c3 * (height // 4) * (width_px // 4)  # two 2x2 max-pools, floor
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def _norm_act(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``relu(norm(x))``, or ``norm(x)`` alone where the norm applies its activation itself."""
        x = norm(x)
        return x if norm_activates(norm) else self.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C_in, H, W)
        x = self._norm_act(self.bn1, self.conv1(x))  # (N, w, H, W)
        x = self.pool(self._norm_act(self.bn2, self.conv2(x)))  # (N, 2w, H/2, W/2)
        x = self.pool(self._norm_act(self.bn3, self.conv3(x)))  # (N, 4w, H/4, W/4)
        x = torch.flatten(self.avgpool(x), 1)  # (N, 4w*H/4*W/4) flatten; (N, 4w) gap
        if x.shape[1] != self.fc1.in_features:
            raise ValueError(f"simple_cnn (head=flatten) was built for {self.fc1.in_features} features, got "
                             f"{x.shape[1]} from input of shape {tuple(x.shape)}; build it for this input_size "
                             "or use head=gap")
        return self.fc2(self.relu(self.fc1(x)))  # (N, num_classes)


SIMPLE_CNN_HEADS = ("flatten", "gap")


# Both baselines come from the seeds' MNIST recipes: 1 channel, 28x28.
MNIST_INPUT = (1, 28)

# Side length MLP assumes when build_model gets no input_size: MNIST's 28x28.
MLP_DEFAULT_INPUT_SIZE = MNIST_INPUT[1]

# SimpleCNN's two 2x2 max-pools need at least 4x4 inputs.
SIMPLE_CNN_MIN_INPUT_SIZE = 4


@register_model(default_input=MNIST_INPUT)
def mlp(*, num_classes, in_channels, input_size, hidden=(256, 128), dropout=0.2):
    """MLP on flattened images: Linear-ReLU-Dropout per hidden layer (256,128; p=0.2); no norm layers."""
    height, width = _size_pair(MLP_DEFAULT_INPUT_SIZE if input_size is None else input_size)
    return MLP(in_channels * height * width, num_classes, hidden=_hidden_sizes(hidden), dropout=dropout)


@register_model(default_input=MNIST_INPUT)
def simple_cnn(*, num_classes, in_channels, norm, input_size, width=16, hidden=100, head="flatten"):
    """The seeds' CNN: 3 conv-norm-ReLU (16/32/64), 2 max-pools, flatten (or head=gap), 100-unit layer; input >= 4x4."""
    size = _size_pair(MNIST_INPUT[1] if input_size is None else input_size)
    if min(size) < SIMPLE_CNN_MIN_INPUT_SIZE:
        raise SpecError(f"simple_cnn needs inputs of at least {SIMPLE_CNN_MIN_INPUT_SIZE}x{SIMPLE_CNN_MIN_INPUT_SIZE}, "
                        f"got input_size={input_size!r}")
    return SimpleCNN(num_classes=num_classes, in_channels=in_channels, norm=norm, width=_positive_int(width, "width"),
                     hidden=_positive_int(hidden, "hidden"), head=str(head), input_size=size)
