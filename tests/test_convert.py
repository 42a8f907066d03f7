"""reslab.convert: every norm layer of any model swapped for a spec's, atomically, with its state."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import reslab
from reslab.convert import BatchNormNd, ChannelsLast, GhostBatchNormNd, RMSNormNd, convert_norms
from reslab.errors import SpecError
from reslab.inits import init_weights
from reslab.norms import InstanceNorm2dAffine, LayerNorm2d, RMSNorm2d

BN_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random affine and running statistics in every norm layer, so copies are checked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name in ("weight", "bias", "running_mean"):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    t.copy_(torch.randn(t.shape, generator=gen))
            if isinstance(getattr(module, "running_var", None), torch.Tensor):
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def norm_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """path -> {weight, bias} of every BatchNorm-like layer, cloned."""
    return {path: {k: getattr(m, k).detach().clone() for k in ("weight", "bias")}
            for path, m in model.named_modules() if isinstance(m, BN_TYPES)}


@pytest.mark.parametrize("build", [torchvision.models.resnet50, torchvision.models.mobilenet_v3_small])
def test_torchvision_models_to_gn(build):
    torch.manual_seed(0)
    model = build(weights=None)
    randomize(model)
    before = norm_state(model)
    assert len(before) > 10

    out, report = convert_norms(model, "gn")

    assert out is model
    assert not [m for m in model.modules() if isinstance(m, BN_TYPES)]
    assert report.counts == {"BatchNorm2d": len(before)}
    assert len(report) == len(before) and [r.path for r in report] == list(before)
    modules = dict(model.named_modules())
    for path, tensors in before.items():
        gn = modules[path]
        assert type(gn) is nn.GroupNorm and gn.num_channels == tensors["weight"].numel()
        assert torch.equal(gn.weight, tensors["weight"]) and torch.equal(gn.bias, tensors["bias"])
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    y.square().mean().backward()
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 64, 1), nn.BatchNorm2d(64))


def test_bad_group_count_names_layer_and_leaves_model_untouched():
    model = small_cnn()
    randomize(model)
    types = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(SpecError) as info:
        convert_norms(model, "gn:32")

    message = str(info.value)
    assert "\n" not in message
    assert "4 (BatchNorm2d(48), 48 channels)" in message and "'gn:32'" in message
    assert "valid for 48 channels" in message  # the norm's own reason
    assert [type(m) for m in model.modules()] == types  # the 32- and 64-channel layers were not swapped
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_several_failures_are_counted():
    model = nn.Sequential(nn.BatchNorm2d(48), nn.BatchNorm2d(40), nn.BatchNorm2d(64))
    with pytest.raises(SpecError, match=r"^cannot convert 0 .*\(1 more layers fail as well\)$"):
        convert_norms(model, "gn:32")
    assert all(type(m) is nn.BatchNorm2d for m in model)


@pytest.mark.parametrize("spec", ["nope", "gn:groups=2,cpg=4", "gn:0", "bn:ghost=2,splits=2", ""])
def test_bad_spec_is_spec_error(spec):
    model = small_cnn()
    with pytest.raises(SpecError):
        convert_norms(model, spec)
    assert type(model[1]) is nn.BatchNorm2d


def test_frozen_batchnorm_to_bn_keeps_function_and_to_gn_keeps_affine():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8))
    randomize(model)
    model.eval()
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    frozen = model[1]

    _, report = convert_norms(model, "bn")

    bn = model[1]
    assert type(bn) is nn.BatchNorm2d and not bn.training
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, name), getattr(frozen, name))
    assert report.rows[0].copied == ("weight", "bias", "running_mean", "running_var")
    assert report.counts == {"FrozenBatchNorm2d": 1}
    torch.testing.assert_close(model(x), expected)

    model[1] = frozen
    convert_norms(model, "gn")
    assert type(model[1]) is nn.GroupNorm and torch.equal(model[1].weight, frozen.weight)
    assert torch.equal(model[1].bias, frozen.bias)


def test_sync_batchnorm_on_cpu():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.SyncBatchNorm(16))
    randomize(model)
    sync = model[1]

    _, report = convert_norms(model, "gn:4")
    assert type(model[1]) is nn.GroupNorm and model[1].num_groups == 4
    assert torch.equal(model[1].weight, sync.weight) and report.counts == {"SyncBatchNorm": 1}

    model[1] = sync
    convert_norms(model, "bn")  # SyncBatchNorm takes any (N, C, *): so does its replacement
    bn = model[1]
    assert isinstance(bn, BatchNormNd) and isinstance(bn, nn.BatchNorm2d)
    assert torch.equal(bn.running_mean, sync.running_mean) and torch.equal(bn.running_var, sync.running_var)
    assert bn(torch.randn(4, 16, 5)).shape == (4, 16, 5)


def test_layernorm_over_channels():
    gen = torch.Generator().manual_seed(1)
    ln = nn.LayerNorm(8)
    randomize(nn.Sequential(ln))
    model = nn.Sequential(nn.Linear(4, 8), ln)
    x = torch.randn(5, 4, generator=gen)
    expected = model(x)

    _, report = convert_norms(model, "ln")

    # over (N, C) input, GroupNorm(1, C) is exactly LayerNorm over C
    assert isinstance(model[1], ChannelsLast) and isinstance(model[1].norm, LayerNorm2d)
    assert report.rows[0].new == "ChannelsLast(LayerNorm2d(8))"
    torch.testing.assert_close(model(x), expected)
    tokens = torch.randn(2, 7, 4, generator=gen)  # (N, L, C): channels stay last
    assert model(tokens).shape == (2, 7, 8)


def test_layernorm_to_rms_and_over_several_dims_is_skipped():
    model = nn.Sequential(nn.LayerNorm(8), nn.LayerNorm([4, 8]))
    _, report = convert_norms(model, "rms")
    assert type(model[0]) is nn.RMSNorm and model[0].eps == 1e-6
    assert type(model[1]) is nn.LayerNorm and report.skipped == (("1", "LayerNorm((4, 8))"),)
    assert report.counts == {"LayerNorm": 1} and "skipped 1" in report.format_table()


def test_torchvision_layernorm2d_takes_nchw_and_other_subclasses_are_refused():
    from torchvision.models.convnext import LayerNorm2d as TvLayerNorm2d

    model = nn.Sequential(nn.Conv2d(3, 8, 1), TvLayerNorm2d(8))
    convert_norms(model, "gn:2")
    assert type(model[1]) is nn.GroupNorm
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 8, 4, 4)

    class Odd(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.BatchNorm1d(8), Odd(8))
    with pytest.raises(SpecError, match=r"cannot convert 1 \(Odd\(8\), 8 channels\).*forward of its own"):
        convert_norms(model, "gn")
    assert type(model[0]) is nn.BatchNorm1d
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct(8))
    with pytest.raises(SpecError, match=r"cannot convert 1 \(BatchNormAct\(8\), 8 channels\)"):
        convert_norms(model, "none")
    assert type(model[1]) is BatchNormAct


def test_instancenorm2d_to_in_is_the_same_function():
    model = nn.Sequential(nn.InstanceNorm2d(6, affine=True), nn.InstanceNorm2d(6))
    randomize(model)
    x = torch.randn(3, 6, 5, 5)
    expected = model(x)
    _, report = convert_norms(model, "in")
    assert all(type(m) is InstanceNorm2dAffine for m in model)
    assert report.counts == {"InstanceNorm2d": 2}
    assert [r.copied for r in report] == [("weight", "bias"), ()]
    torch.testing.assert_close(model(x), expected)


def test_none_gives_identity():
    model = small_cnn()
    _, report = convert_norms(model, "none")
    assert [type(model[i]) for i in (1, 4, 7)] == [nn.Identity] * 3
    assert {r.new for r in report} == {"Identity"} and all(r.copied == () for r in report)
    assert not any(isinstance(m, BN_TYPES) for m in model.modules())


def test_dtype_and_train_mode_kept():
    model = small_cnn().double().eval()
    convert_norms(model, "gn")
    assert all(t.dtype == torch.float64 for t in model.state_dict().values())
    assert not any(m.training for m in model.modules())
    assert model(torch.randn(1, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64

    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.InstanceNorm2d(4)).double()  # no tensors of its own
    convert_norms(model, "bn")
    assert model[1].weight.dtype == torch.float64


def test_copy_affine_false_and_frozen_parameters():
    model = small_cnn()
    randomize(model)
    model[1].weight.requires_grad_(False)
    convert_norms(model, "gn", copy_affine=False)
    assert torch.equal(model[1].weight, torch.ones(32)) and torch.equal(model[1].bias, torch.zeros(32))
    assert model[1].weight.requires_grad

    model = small_cnn()
    randomize(model)
    model[1].weight.requires_grad_(False)
    convert_norms(model, "gn")
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad


def test_rms_keeps_scale_only_and_works_on_any_rank():
    model = nn.Sequential(nn.BatchNorm1d(6), nn.BatchNorm2d(6), nn.BatchNorm3d(6))
    randomize(model)
    scales = [m.weight.detach().clone() for m in model]
    _, report = convert_norms(model, "rms")
    assert [type(m) for m in model] == [RMSNormNd, RMSNorm2d, RMSNormNd]
    assert all(r.copied == ("weight",) for r in report)
    for m, scale in zip(model, scales, strict=True):
        assert torch.equal(m.weight, scale)
    for x in (torch.randn(3, 6), torch.randn(3, 6, 4), torch.randn(3, 6, 2, 2, 2)):
        expected = x / x.square().mean(1, keepdim=True).add(1e-6).sqrt() * scales[0].view(1, -1, *[1] * (x.dim() - 2))
        torch.testing.assert_close(model[0](x), expected)


def test_bn_on_1d_and_3d_keeps_the_rank():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm3d(4), nn.InstanceNorm1d(4), nn.GroupNorm(2, 4))
    convert_norms(model, "bn:momentum=0.01,eps=1e-3")
    assert [type(m) for m in model] == [nn.BatchNorm1d, nn.BatchNorm3d, nn.BatchNorm1d, BatchNormNd]
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in model)

    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm3d(4)).eval()
    convert_norms(model, "bn:ghost=2")
    assert all(type(m) is GhostBatchNormNd and m.ghost == 2 for m in model)
    assert model[0](torch.randn(4, 4)).shape == (4, 4)
    assert model[1](torch.randn(4, 4, 2, 2, 2)).shape == (4, 4, 2, 2, 2)


def test_converted_model_converts_again():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.SyncBatchNorm(8))
    convert_norms(model, "gn:2")
    _, report = convert_norms(model, "bn")
    assert [r.path for r in report] == ["1.norm", "3"]
    assert isinstance(model[1], ChannelsLast) and type(model[1].norm) is BatchNormNd
    _, report = convert_norms(model, "rms")
    assert report.counts == {"BatchNormNd": 2} and type(model[3]) is RMSNormNd
    assert model(torch.randn(3, 4)).shape == (3, 8)


def test_shared_layer_gets_one_replacement():
    bn = nn.BatchNorm2d(8)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), bn, nn.Conv2d(8, 8, 1), bn)
    _, report = convert_norms(model, "gn")
    assert model[1] is model[3] and type(model[1]) is nn.GroupNorm
    assert len(report) == 1 and report.rows[0].path == "1"


def test_ghost_and_rms_layers_of_reslab_convert():
    model = reslab.build_model("cifar_resnet20", norm="bn:ghost=2", num_classes=10)
    n = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    _, report = convert_norms(model, "rms")
    assert report.counts == {"GhostBatchNorm2d": n}
    model2 = reslab.build_model("cifar_resnet20", norm="rms", num_classes=10)
    _, report = convert_norms(model2, "ln")
    assert report.counts == {"RMSNorm2d": n} and all(r.copied == ("weight",) for r in report)
    assert not any(isinstance(m, (nn.RMSNorm, RMSNorm2d)) for m in model2.modules())


def test_refusals():
    lazy = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(SpecError, match="cannot convert 1 .*lazy"):
        convert_norms(lazy, "gn")
    with pytest.raises(SpecError, match="itself a BatchNorm2d"):
        convert_norms(nn.BatchNorm2d(4), "gn")
    with pytest.raises(SpecError, match="needs an nn.Module"):
        convert_norms("resnet18", "gn")


def test_report_is_frozen_and_tabulates():
    model = small_cnn()
    _, report = convert_norms(model, "gn:cpg=16")
    assert report.spec == "gn:cpg=16" and len(report) == 3
    table = report.format_table().splitlines()
    assert table[0].split() == ["path", "old", "new", "copied"]
    assert table[2].split() == ["1", "BatchNorm2d(32)", "GroupNorm(32,", "groups=2)", "weight,",
                                "bias"]
    assert report.to_dicts()[1]["old"] == "BatchNorm2d(48)" and report.to_dicts()[1]["channels"] == 48
    assert "BatchNorm2d x3" in repr(report)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.spec = "bn"


def test_exported_convert_norms_turns_a_torchvision_resnet_to_group_norm():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected_shape = model(x).shape
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    randomize(model)
    scales = [m.weight.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    converted, report = reslab.convert_norms(model, "gn")
    assert converted is model and "convert_norms" in reslab.__all__
    assert not any(isinstance(m, BN_TYPES) for m in model.modules())
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == batch_norms == len(report.rows) == 20
    assert all(torch.equal(g.weight, w) for g, w in zip(groups, scales, strict=True))  # affine carried over
    out = model(x)
    assert out.shape == expected_shape == (2, 1000) and torch.isfinite(out).all()


def count_rows(report, kind):
    return sum(row.kind == kind for row in report)


def test_init_weights_on_any_model():
    model = torchvision.models.resnet18(weights=None)
    report = init_weights(model, "kaiming_normal:mode=fan_out", seed=0)
    assert len(report) == len(list(model.parameters()))
    assert count_rows(report, "conv") == 20 and count_rows(report, "linear") == 1
    assert count_rows(report, "norm") == 40 and count_rows(report, "other") == 0
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).mean((2, 3)))

    net = Net()
    report = init_weights(net, {"conv": "xavier_uniform", "linear": "zeros"}, seed=1)
    assert [row.kind for row in report] == ["conv", "bias", "norm", "norm", "linear", "bias"]
    assert torch.equal(net.fc.weight, torch.zeros(2, 8)) and torch.equal(net.conv.bias, torch.zeros(8))

    convert_norms(model, "gn")  # and after a conversion, the new norms are norms too
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight)
    report = init_weights(model, "default", seed=0)
    assert count_rows(report, "norm") == 40
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if isinstance(m, nn.GroupNorm))


def test_batch_renorm_converts_both_ways():
    model = reslab.build_model("cifar_resnet20", norm="brn", num_classes=10)
    model, report = reslab.convert_norms(model, "gn")
    assert report.counts == {"BatchRenorm2d": 19} and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model, report = reslab.convert_norms(model, "brn:r_max=2,d_max=1")
    assert report.counts == {"GroupNorm": 19}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
