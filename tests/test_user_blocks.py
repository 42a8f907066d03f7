"""zero_init_residual, Fixup and SkipInit on residual blocks reslab did not build: a user's own
blocks that declare ``residual_branch()``, timm's (``zero_init_last()``) and torchvision's."""

import copy
import math

import pytest
import timm
import timm.models.resnet
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reslab.errors import SpecError
from reslab.inits import init_weights
from reslab.model_inits import attach_branch
from reslab.models import build_model
from reslab.models.torchvision_models import _mark_residual_blocks

HE = "kaiming_normal:mode=fan_out,nonlinearity=relu"  # the base of fixup and skipinit


class UserBlock(nn.Module):
    """A residual block of a user's own: ``depth`` 3x3 convs, each followed by a batch norm (or an
    Identity, as ``--norm none`` leaves it), ReLUs between them, a projection where the shape changes."""

    def __init__(self, cin, cout, stride=1, *, norm=True, depth=2):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin if i == 0 else cout, cout, 3, stride if i == 0 else 1, 1, bias=False)
                                   for i in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm2d(cout) if norm else nn.Identity() for _ in range(depth))
        self.proj = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def residual_branch(self):
        return [layer for pair in zip(self.convs, self.norms, strict=True) for layer in pair]

    def shortcut(self, x):
        return x if self.proj is None else self.proj(x)

    def forward(self, x):
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            out = norm(conv(out))
            if i < len(self.convs) - 1:
                out = torch.relu(out)
        return torch.relu(out + self.shortcut(x))


class UserNet(nn.Module):
    def __init__(self, *, norm=True, depth=2, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8) if norm else
                                  nn.Identity(), nn.ReLU())
        self.blocks = nn.Sequential(UserBlock(8, 8, norm=norm, depth=depth),
                                    UserBlock(8, 16, 2, norm=norm, depth=depth),
                                    UserBlock(16, 16, norm=norm, depth=depth))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class MLPBlock(nn.Module):
    """A residual block of Linear layers: x + fc2(relu(fc1(x)))."""

    def __init__(self, width=12):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def residual_branch(self):
        return [self.fc1, self.fc2]

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def _x(shape=(4, 3, 16, 16), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _user_net(**kwargs):
    torch.manual_seed(0)
    return UserNet(**kwargs)


def _block_io(model, x, kinds):
    """(block, input, output) of every block of ``kinds`` in an eval-mode forward pass of ``x``."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].clone(), out.clone())))
             for m in model.modules() if isinstance(m, kinds)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _without_branches(model, kinds):
    """A copy of ``model`` whose blocks return relu(shortcut(x)): every residual branch removed."""
    bare = copy.deepcopy(model)
    for block in bare.modules():
        if isinstance(block, kinds):
            shortcut = block.shortcut if isinstance(block, UserBlock) else block.downsample or nn.Identity()
            block.forward = lambda x, shortcut=shortcut: torch.relu(shortcut(x))
    return bare


# --- zero_init_residual ---------------------------------------------------------------------------

def _zero_weights(model):
    return sorted(name for name, p in model.named_parameters() if name.endswith("weight") and torch.all(p == 0))


@pytest.mark.parametrize("make, last", [
    (lambda **kw: timm.create_model("resnet18", num_classes=10, pretrained=False, **kw), "bn2"),
    (lambda **kw: timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, **kw),
     "bn3"),
])
def test_zero_init_residual_on_timm_resnets_matches_timms_own_zero_init_last(make, last):
    reference = _zero_weights(make())  # timm's construction: zero_init_last=True
    model = make(zero_init_last=False)
    assert _zero_weights(model) == []
    report = init_weights(model, {"conv": HE, "zero_init_residual": True}, seed=0)
    zeroed = _zero_weights(model)
    assert zeroed == reference and len(zeroed) >= 4 and all(n.endswith(f"{last}.weight") for n in zeroed)
    assert sorted(r.path for r in report if r.scheme == "zeros (zero_init_residual)") == zeroed
    block_io = _block_io(model, _x((2, 3, 32, 32)), (timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck))
    assert len(block_io) == len(zeroed)
    for block, inp, out in block_io:  # each block starts as its shortcut, relu'd
        shortcut = inp if block.downsample is None else block.downsample(inp)
        assert torch.equal(out, torch.relu(shortcut))


def test_zero_init_residual_recorded_on_a_timm_model_survives_init_weights():
    model = timm.models.resnet.resnet18(num_classes=10, zero_init_last=False)
    model.zero_init_residual = True
    init_weights(model, "kaiming_normal", seed=0)
    zeroed = _zero_weights(model)
    assert len(zeroed) == 8 and all(n.endswith("bn2.weight") for n in zeroed)
    assert torch.all(model.layer1[0].bn1.weight == 1)


def test_zero_init_residual_zeroes_the_last_norm_of_a_declared_branch():
    model = _user_net()
    assert not hasattr(model.blocks[0], "zero_init_last")
    init_weights(model, {"conv": HE, "zero_init_residual": True}, seed=0)
    assert _zero_weights(model) == [f"blocks.{i}.norms.1.weight" for i in range(3)]
    assert all(torch.all(b.norms[0].weight == 1) for b in model.blocks)
    for block, inp, out in _block_io(model, _x(), UserBlock):
        assert torch.equal(out, torch.relu(block.shortcut(inp)))


def test_zero_init_residual_on_branches_without_a_norm_scale_says_how_to_fix_it():
    with pytest.raises(SpecError) as info:
        init_weights(_user_net(norm=False), {"zero_init_residual": True})
    text = str(info.value)
    assert "\n" not in text and "UserNet" in text
    assert "zero_init_last() or residual_branch()" in text and "reslab.model_inits" in text


# --- SkipInit -------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [True, False])
def test_skipinit_starts_every_block_as_its_shortcut_and_its_gains_train(norm):
    model = _user_net(norm=norm)
    assert attach_branch(model, "skipinit", "UserNet") == 3
    report = init_weights(model, "skipinit", seed=0)
    gains = [f"blocks.{i}.skipinit_gain" for i in range(3)]
    assert set(gains) <= set(model.state_dict()) and set(gains) <= dict(model.named_parameters()).keys()
    assert {r.path: r.scheme for r in report if r.path in gains} == dict.fromkeys(gains, "zeros (skipinit gain)")

    x = _x()
    bare = _without_branches(model, UserBlock)
    model.train(), bare.train()
    assert torch.equal(model(x), bare(x))  # every branch multiplied by 0

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    for block in model.blocks:
        assert block.skipinit_gain.grad is not None and block.skipinit_gain.grad != 0
    optimizer.step()
    assert all(block.skipinit_gain != 0 for block in model.blocks)
    assert not torch.allclose(model(x), bare(x))  # the trained gains let the branches in


def test_skipinit_on_torchvision_resnet18_blocks():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _mark_residual_blocks(model, False)
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert blocks[0].residual_branch() == [blocks[0].conv1, blocks[0].bn1, blocks[0].conv2, blocks[0].bn2]
    assert attach_branch(model, "skipinit", "tv:resnet18") == 8
    init_weights(model, "skipinit", seed=0)
    block_io = _block_io(model, _x((2, 3, 32, 32)), torchvision.models.resnet.BasicBlock)
    assert len(block_io) == 8
    for block, inp, out in block_io:
        shortcut = inp if block.downsample is None else block.downsample(inp)
        assert torch.equal(out, torch.relu(shortcut))


# --- Fixup ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [2, 3])
def test_fixup_scales_the_he_base_by_l_to_the_minus_one_over_2m_minus_2(depth):
    model, base = _user_net(norm=False, depth=depth), _user_net(norm=False, depth=depth)
    attach_branch(model, "fixup", "UserNet")
    report = init_weights(model, "fixup", seed=0)
    init_weights(base, {"conv": HE, "linear": "zeros"}, seed=0)  # the same draws, before the model step
    factor = 3 ** (-1 / (2 * depth - 2))  # L = 3 branches of m = depth convs
    rows = {r.path: r for r in report}
    for i, (block, ref) in enumerate(zip(model.blocks, base.blocks, strict=True)):
        for conv, ref_conv in zip(block.convs[:-1], ref.convs[:-1], strict=True):
            assert torch.count_nonzero(ref_conv.weight) == ref_conv.weight.numel()
            assert torch.equal(conv.weight, ref_conv.weight * factor)
        assert torch.count_nonzero(block.convs[-1].weight) == 0
        row = rows[f"blocks.{i}.convs.0.weight"]
        fan_out = block.convs[0].weight.shape[0] * 9
        assert row.std_predicted == pytest.approx(math.sqrt(2 / fan_out) * factor) and f"x {factor:.4g}" in row.scheme
        if block.proj is not None:
            assert torch.equal(block.proj.weight, ref.proj.weight)  # the shortcut is not the branch
        names = [n for n, _ in block.named_parameters(recurse=False)]
        expected = [n for k in range(1, depth) for n in (f"bias{k}a", f"bias{k}b")] + [
            f"bias{depth}a", "scale", f"bias{depth}b"]
        assert names == expected  # reslab's own fixup blocks' names, in forward order
        for name in names:
            assert getattr(block, name).item() == (1.0 if name == "scale" else 0.0)
    assert torch.equal(model.stem[0].weight, base.stem[0].weight)
    assert torch.count_nonzero(model.head[2].weight) == 0


@pytest.mark.parametrize("norm", [True, False])
def test_fixup_block_forward_matches_the_hand_computed_one(norm):
    """Zhang et al. 2019, Fig. 1: a bias before each conv and each activation, a multiplier and a
    bias at the end of the branch; with a norm, the activation's bias follows the norm."""
    model = _user_net(norm=norm)
    attach_branch(model, "fixup", "UserNet")
    init_weights(model, "fixup", seed=0)
    block = model.blocks[1]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    x = _x((2, 8, 8, 8), seed=1)
    b = block

    def norm_(i, h):  # the layer's own arithmetic, without its hooks (eval mode: running statistics)
        n = block.norms[i]
        return F.batch_norm(h, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps) if norm else h

    out = norm_(0, F.conv2d(x + b.bias1a, b.convs[0].weight, stride=2, padding=1))
    out = F.relu(out + b.bias1b)
    out = norm_(1, F.conv2d(out + b.bias2a, b.convs[1].weight, padding=1))
    out = out * b.scale + b.bias2b
    torch.testing.assert_close(block(x), F.relu(out + F.conv2d(x, b.proj.weight, stride=2)))
    # a deep copy's hooks use the copy's scalars, not the original's
    twin = copy.deepcopy(block)
    with torch.no_grad():
        twin.scale.fill_(0.0)
    torch.testing.assert_close(block(x), F.relu(out + F.conv2d(x, b.proj.weight, stride=2)))
    torch.testing.assert_close(twin(x), F.relu(b.bias2b + F.conv2d(x, b.proj.weight, stride=2)))


def test_fixup_state_dict_round_trips_into_a_rebuilt_model():
    model = _user_net(norm=False)
    attach_branch(model, "fixup", "UserNet")
    init_weights(model, "fixup", seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # trained, as far as the scalars and the zero convs go
    rebuilt = _user_net(norm=False)
    attach_branch(rebuilt, "fixup", "UserNet")
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = _x()
    model.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(x), model(x))
    plain = _user_net(norm=False)
    with pytest.raises(RuntimeError, match="bias1a"):  # without the branch the saved scalars do not fit
        plain.load_state_dict(model.state_dict(), strict=True)


def test_fixup_draws_a_branch_of_linear_layers_as_the_convs():
    torch.manual_seed(0)
    model = nn.Sequential(MLPBlock(), MLPBlock(), nn.Linear(12, 3))
    assert attach_branch(model, "fixup", "mlp") == 2
    report = init_weights(model, "fixup", seed=0)
    factor = 2 ** (-1 / 2)
    rows = {r.path: r for r in report}
    for i in range(2):
        fc1, fc2 = model[i].fc1, model[i].fc2
        assert torch.count_nonzero(fc2.weight) == 0 and torch.count_nonzero(fc1.weight) == fc1.weight.numel()
        assert rows[f"{i}.fc1.weight"].std_predicted == pytest.approx(math.sqrt(2 / 24) * factor)
        assert fc1.weight.std().item() == pytest.approx(math.sqrt(2 / 24) * factor, rel=0.15)
    assert torch.count_nonzero(model[2].weight) == 0  # the classifier: the base's zeros
    x = _x((5, 12))
    assert torch.equal(model[1](model[0](x)), x)  # both branches 0 at init


def test_torchvision_bottleneck_blocks_take_fixup():
    torch.manual_seed(0)
    bottleneck = torchvision.models.resnet.Bottleneck
    model = nn.Sequential(bottleneck(16, 4), bottleneck(16, 4), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    _mark_residual_blocks(model, False)
    block = model[0]
    assert block.residual_branch() == [block.conv1, block.bn1, block.conv2, block.bn2, block.conv3, block.bn3]
    assert attach_branch(model, "fixup", "tv:resnet50") == 2
    init_weights(model, "fixup", seed=0)
    assert [n for n, _ in block.named_parameters(recurse=False)] == [
        "bias1a", "bias1b", "bias2a", "bias2b", "bias3a", "scale", "bias3b"]
    assert all(torch.count_nonzero(b.conv3.weight) == 0 for b in model[:2])
    x = _x((2, 16, 8, 8))
    model.eval()
    assert torch.equal(model[0](x), torch.relu(x))  # each block starts as its shortcut


# --- refusals -------------------------------------------------------------------------------------

def _one_line_error(fn, *args, **kwargs):
    with pytest.raises(SpecError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_attach_branch_refuses_a_model_without_declared_blocks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    assert _one_line_error(attach_branch, model, "fixup", "my_net.py:Net") == (
        "init 'fixup' needs residual blocks that declare their branch: give each block residual_branch() "
        "(see reslab.model_inits) — my_net.py:Net has none")


def test_attach_branch_refuses_fixup_on_a_one_conv_branch_and_changes_nothing():
    model = nn.Sequential(UserBlock(8, 8), UserBlock(8, 8, depth=1))
    before = list(model.state_dict())
    text = _one_line_error(attach_branch, model, "fixup", "Net")
    assert "at least 2 convs" in text and "L^(-1/(2m-2))" in text and "1 (Conv2d, BatchNorm2d)" in text
    assert list(model.state_dict()) == before  # the first block, which could, was not changed either
    assert attach_branch(model, "skipinit", "Net") == 2  # one conv is enough for a gain


def test_attach_branch_refuses_nf_unknown_branches_and_a_second_attach():
    model = _user_net()
    assert "reslab's pre-activation blocks" in _one_line_error(attach_branch, model, "nf", "Net")
    assert "--init nf" in _one_line_error(attach_branch, model, "nf", "Net")
    assert "valid choices: fixup, skipinit" in _one_line_error(attach_branch, model, "lsuv", "Net")
    attach_branch(model, "skipinit", "Net")
    x = _x()
    model.eval()
    expected = model(x)
    for branch in ("skipinit", "fixup"):
        text = _one_line_error(attach_branch, model, branch, "Net")
        assert "blocks.0 already has the skipinit branch attached" in text
    assert torch.equal(model(x), expected)  # no second set of hooks


def test_attach_branch_refuses_a_name_the_block_already_uses():
    model = _user_net()
    model.blocks[2].scale = 2.0
    assert "blocks.2 already has an attribute 'scale'" in _one_line_error(attach_branch, model, "fixup", "Net")


def test_init_on_declared_blocks_without_the_attached_branch_says_to_attach():
    text = _one_line_error(init_weights, _user_net(), "fixup")
    assert "attach_branch(model, 'fixup', label)" in text
    assert "reslab's pre-activation blocks" in _one_line_error(init_weights, _user_net(), "nf")


def test_reslab_resnets_keep_their_own_branches():
    model = build_model("cifar_resnet20", norm="none", branch="skipinit", width=4)
    assert "has none" in _one_line_error(attach_branch, model, "skipinit", "cifar_resnet20")
    init_weights(model, "skipinit", seed=0)
    assert all(b.skipinit_gain.item() == 0 for b in model.modules() if hasattr(b, "skipinit_gain"))
