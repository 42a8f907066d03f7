"""Every number a run records is the number of the run it names.

zero_init_residual surviving initialization, init policies as YAML mappings,
what a resume may and may not change, refusals before any work, the training
options that shape the numbers (label smoothing, clipping, warmup, nesterov,
channels_last, val_split, no decay on norms and biases), and torch.compile.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml

import reslab
from reslab.cli import main, parse_args, train_config_from_args
from reslab.config import TrainConfig, config_from_dict
from reslab.errors import SpecError
from reslab.training import Trainer, build_for, check_config, train

SYNTH = "synthetic:train=192,test=64,size=8,channels=1,classes=4"
TINY = ["--dataset", SYNTH, "--model", "simple_cnn", "--norm", "gn", "--batch-size", "32", "--optimizer", "sgd",
        "--lr", "0.05", "--progress", "none"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny(tiny_config):
    """``tiny(out, **overrides)``: the shared tiny run as a TrainConfig, with GroupNorm, for two epochs."""

    def make(out, **overrides):
        return TrainConfig(**tiny_config(out, **{"norm": "gn", "epochs": 2, **overrides}))

    return make


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_norm_scales(model):
    return [block.bn2.weight for stage in (model.layer1, model.layer2, model.layer3) for block in stage]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- zero_init_residual -------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["default", "kaiming_normal", "xavier_uniform"])
def test_model_option_zero_init_residual_survives_init_weights(scheme):
    model = reslab.build_model("cifar_resnet20", norm="bn", num_classes=10, zero_init_residual=True)
    report = reslab.init_weights(model, scheme, seed=0)
    scales = last_norm_scales(model)
    assert len(scales) == 9 and all(torch.count_nonzero(w) == 0 for w in scales)
    first = [block.bn1.weight for block in model.layer1]
    assert all(torch.equal(w, torch.ones_like(w)) for w in first)  # only the branches' last norms
    rows = {r.path: r for r in report}
    assert rows["layer1.0.bn2.weight"].scheme.startswith("zeros") and rows["layer1.0.bn2.weight"].std_measured == 0


def test_policy_zero_init_residual_works_on_a_model_built_without_it():
    model = reslab.build_model("resnet18", norm="gn", num_classes=10)
    reslab.init_weights(model, {"conv": "kaiming_normal:mode=fan_out", "zero_init_residual": True}, seed=0)
    zeroed = [m.bn2.weight for m in model.modules() if isinstance(m, reslab.models.resnet.BasicBlock)]
    assert len(zeroed) == 8 and all(torch.count_nonzero(w) == 0 for w in zeroed)


def test_policy_and_model_must_agree_and_plain_nets_refuse():
    model = reslab.build_model("cifar_resnet20", norm="bn", num_classes=10, zero_init_residual=True)
    with pytest.raises(SpecError, match="zero_init_residual"):
        reslab.init_weights(model, {"conv": "kaiming_normal", "zero_init_residual": False})
    with pytest.raises(SpecError, match="zero_init_residual"):
        reslab.init_weights(reslab.build_model("plain20", norm="bn", num_classes=10),
                            {"conv": "kaiming_normal", "zero_init_residual": True})
    with pytest.raises(SpecError, match="norm"):
        reslab.build_model("cifar_resnet20", norm="none", num_classes=10, zero_init_residual=True)


def test_cli_zero_init_residual_reaches_the_trained_model(capsys, tmp_path):
    cfg = train_config_from_args(parse_args(["train", *TINY, "--model", "cifar_resnet20", "--init",
                                             "kaiming_normal", "--zero-init-residual"]))
    data = reslab.load_dataset(cfg.dataset, seed=0)
    model = build_for(cfg, data)
    assert all(torch.count_nonzero(w) == 0 for w in last_norm_scales(model))
    # the same through an init policy mapping in a config file
    path = tmp_path / "zir.yaml"
    path.write_text(yaml.safe_dump({"init": {"conv": "kaiming_normal", "zero_init_residual": True}}))
    cfg = train_config_from_args(parse_args(["train", "--config", str(path), *TINY, "--model", "cifar_resnet20"]))
    assert all(torch.count_nonzero(w) == 0 for w in last_norm_scales(build_for(cfg, data)))
    code, _, err = cli(capsys, "train", "--config", str(path), *TINY, "--model", "plain20", "--epochs", "1",
                       "--out", tmp_path / "plain")
    assert code == 2 and "zero_init_residual" in err and not (tmp_path / "plain").exists()


@pytest.mark.slow
def test_inspect_shows_zeroed_branch_scales(capsys):
    code, out, _ = cli(capsys, "inspect", "cifar_resnet20", "--init", "kaiming_normal", "-o", "zero_init_residual=true")
    assert code == 0
    line = next(row for row in out.splitlines() if row.startswith("layer1.0.bn2.weight"))
    assert "zero_init_residual" in line and line.split()[-1] == "0"


# --- init policies as mappings --------------------------------------------------------------


def test_yaml_policy_trains_end_to_end_and_round_trips(capsys, tmp_path):
    policy = {"conv": "kaiming_normal:mode=fan_out", "linear": "normal:std=0.01", "bias": "zeros"}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"init": policy, "epochs": 1}))
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", "--config", config, *TINY, "--out", out)
    assert code == 0 and "completed" in stdout, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["init"] == policy
    # config.yaml is itself a valid --config, and resolves to the same config
    code, printed, err = cli(capsys, "train", "--config", out / "config.yaml", "--print-config")
    assert code == 0, err
    assert yaml.safe_load(printed) == {**saved, "resume": False}
    # the mapping is what initialized the model: linear weights N(0, 0.01^2), conv Kaiming fan_out
    model = build_for(config_from_dict(saved), reslab.load_dataset(SYNTH))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(abs(float(m.weight.detach().std()) - 0.01) < 0.002 for m in linears)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.numel() > 1000)
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    # resuming with the same mapping is the same config
    code, _, err = cli(capsys, "train", "--config", out / "config.yaml", "--epochs", "2", "--resume")
    assert code == 0, err
    assert [r["epoch"] for r in metrics(out)] == [1, 2]


def test_init_flag_takes_an_inline_mapping_and_rejects_bad_keys(capsys):
    code, printed, _ = cli(capsys, "train", *TINY, "--init", "{conv: kaiming_normal, linear: zeros}", "--print-config")
    assert code == 0 and yaml.safe_load(printed)["init"] == {"conv": "kaiming_normal", "linear": "zeros"}
    code, _, err = cli(capsys, "train", *TINY, "--init", "{conv: kaiming_normal, lienar: zeros}", "--print-config")
    assert code == 2 and "'lienar'" in err and len(err.strip().splitlines()) == 1


# --- resume -----------------------------------------------------------------------------------


def test_resume_refuses_changed_hyperparameters_and_names_them(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--epochs", "1", "--out", out)[0] == 0
    before = snapshot(out)
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "2", "--lr", "0.01", "--weight-decay", "0",
                       "--out", out, "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--lr 0.05 -> 0.01" in err and "--weight-decay" in err
    assert snapshot(out) == before  # config.yaml still names what produced the numbers


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "multistep"])
def test_resume_refuses_more_epochs_where_the_schedule_depends_on_them(capsys, tmp_path, schedule):
    out = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--schedule", schedule, "--epochs", "1", "--out", out)[0] == 0
    before = snapshot(out)
    code, _, err = cli(capsys, "train", *TINY, "--schedule", schedule, "--epochs", "2", "--out", out, "--resume")
    assert code == 2 and "--epochs 1 -> 2" in err and schedule in err
    assert snapshot(out) == before


def test_resume_may_raise_epochs_under_a_constant_schedule(capsys, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(capsys, "train", *TINY, "--epochs", "2", "--out", straight)[0] == 0
    assert cli(capsys, "train", *TINY, "--epochs", "1", "--out", split)[0] == 0
    first = json.loads((split / "summary.json").read_text())
    # an execution field (eval batch) may change too
    assert cli(capsys, "train", *TINY, "--epochs", "2", "--eval-batch-size", "16", "--out", split, "--resume")[0] == 0
    def exact(rows):
        return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s", "eval_loss")} for r in rows]

    assert exact(metrics(straight)) == exact(metrics(split))
    # another eval batch sums the eval loss in another order: equal to rounding
    assert [r["eval_loss"] for r in metrics(split)] == pytest.approx([r["eval_loss"] for r in metrics(straight)])
    assert yaml.safe_load((split / "config.yaml").read_text())["epochs"] == 2
    second = json.loads((split / "summary.json").read_text())
    # wall time adds up over both sessions; throughput covers both epochs
    assert second["wall_time_s"] >= first["wall_time_s"] + metrics(split)[1]["epoch_time_s"]
    assert second["train_images_per_s"] > 0 and second["epochs_completed"] == 2


def test_resuming_a_finished_run_keeps_its_record(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--epochs", "1", "--out", out)[0] == 0
    before = snapshot(out)
    code, stdout, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", out, "--resume")
    assert code == 0 and "completed" in stdout, err
    assert snapshot(out) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images_per_s"] > 0
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "1", "--schedule", "cosine", "--out", out, "--resume")
    assert code == 2 and "--schedule" in err


# --- refused before any work ---------------------------------------------------------------


def test_mps_and_unsupported_bf16_are_refused_up_front(capsys, tmp_path, monkeypatch, tiny):
    code, _, err = cli(capsys, "train", *TINY, "--device", "mps", "--out", tmp_path / "m")
    assert code == 2 and "mps" in err and "cpu" in err and not (tmp_path / "m").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(SpecError, match="V100.*fp16"):
        check_config(tiny(tmp_path / "b", device="cuda", precision="bf16"))
    check_config(tiny(tmp_path / "b", device="cuda", precision="fp16"))  # fp16 is fine there


def torchrun(*args, nproc=2, script=None, timeout=300):
    target = [script] if script else ["-m", "reslab"]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         *target, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_eval_batch_that_does_not_split_over_ranks_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    done = torchrun("train", *TINY, "--epochs", "1", "--batch-size", "32", "--eval-batch-size", "33", "--out", out)
    assert done.returncode != 0
    assert "--eval-batch-size 33" in done.stderr and "e.g. --eval-batch-size 34" in done.stderr
    assert not out.exists()  # refused before a single step, nothing on disk


@pytest.mark.slow
def test_one_failing_rank_ends_the_job_and_records_why(tmp_path):
    script = tmp_path / "fail_rank1.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import reslab.training as t
        original = t.Trainer.train_epoch
        def train_epoch(self, *args, **kwargs):
            if self.dist.rank == 1 and self.epoch == 1:
                raise RuntimeError("injected fault on rank 1")
            return original(self, *args, **kwargs)
        t.Trainer.train_epoch = train_epoch
        from reslab.cli import main
        sys.exit(main())
    """))
    out = tmp_path / "run"
    done = torchrun("train", *TINY, "--epochs", "3", "--out", out, script=str(script), timeout=240)
    assert done.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rank"] == 1
    assert "injected fault on rank 1" in summary["error"]
    assert [r["epoch"] for r in metrics(out)] == [1]


# --- what shapes the numbers ---------------------------------------------------------------


def first_batch_loss(cfg, label_smoothing):
    data = reslab.load_dataset(cfg.dataset, seed=cfg.seed)
    model = build_for(cfg, data)
    torch.manual_seed(cfg.seed * 1000)
    x, y = next(iter(data.train_batches(cfg.batch_size, epoch=0, seed=cfg.seed)))
    model.train()
    return float(F.cross_entropy(model(x), y, label_smoothing=label_smoothing).detach())


def test_label_smoothing_is_the_loss_trained_on(tmp_path, tiny):
    cfg = tiny(tmp_path / "ls", label_smoothing=0.2, epochs=1)
    result = train(cfg)
    assert result.summary["first_step_loss"] == pytest.approx(first_batch_loss(cfg, 0.2), rel=1e-5)
    assert result.summary["first_step_loss"] != pytest.approx(first_batch_loss(cfg, 0.0), rel=1e-3)


def test_grad_clip_bounds_every_step(tmp_path, tiny):
    clip, lr = 1e-3, 0.5
    cfg = tiny(tmp_path / "clip", grad_clip=clip, lr=lr, momentum=0.0, weight_decay=0.0, epochs=1)
    trainer = Trainer(cfg, tmp_path / "clip", torch.device("cpu"))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])

    trainer.train_epoch()
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    steps = trainer.steps_per_epoch
    # plain SGD: each step moves the weights by lr * ||g||, and clipping caps ||g||
    assert float((after - before).norm()) <= steps * lr * clip * (1 + 1e-4)
    free = Trainer(tiny(tmp_path / "free", lr=lr, momentum=0.0, weight_decay=0.0, epochs=1), tmp_path / "free",
                   torch.device("cpu"))
    free.train_epoch()
    moved = torch.cat([p.detach().flatten() for p in free.model.parameters()]) - before
    assert float(moved.norm()) > 10 * steps * lr * clip


def test_warmup_ramps_the_lr_per_step(tmp_path, tiny):
    train(tiny(tmp_path / "w", warmup_epochs=2, epochs=3, lr=0.06))
    steps = 6  # 192 images / batch 32
    lrs = [r["lr"] for r in metrics(tmp_path / "w")]  # lr at the first step of each epoch
    assert lrs == pytest.approx([0.06 * 1 / (2 * steps), 0.06 * (steps + 1) / (2 * steps), 0.06])


def test_nesterov_reaches_the_optimizer_and_changes_the_run(tmp_path, tiny):
    plain = train(tiny(tmp_path / "p", epochs=1))
    nesterov_cfg = tiny(tmp_path / "n", epochs=1, nesterov=True)
    trainer = Trainer(nesterov_cfg, tmp_path / "n", torch.device("cpu"))
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in trainer.optimizer.param_groups)
    nesterov = train(nesterov_cfg)
    assert nesterov.summary["final_train_loss"] != plain.summary["final_train_loss"]


def test_no_decay_on_norms_and_biases(tmp_path, tiny):
    cfg = tiny(tmp_path / "d", decay_norm_and_bias=False, weight_decay=0.1)
    trainer = Trainer(cfg, tmp_path / "d", torch.device("cpu"))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed, exempt = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    exempt_names = sorted(names[id(p)] for p in exempt["params"])
    expected = sorted(n for n, p in trainer.model.named_parameters()
                      if n.endswith(".bias") or ".bn" in n or n.startswith("bn") or "norm" in n)
    assert exempt_names == expected and exempt_names
    assert all(p.ndim > 1 for p in decayed["params"])


def test_channels_last_gives_the_same_run(tmp_path, tiny):
    nchw = train(tiny(tmp_path / "a", epochs=1, channels_last="off"))
    assert nchw.summary["channels_last"] is False
    trainer = Trainer(tiny(tmp_path / "b", epochs=1, channels_last=True), tmp_path / "b", torch.device("cpu"))
    conv = next(p for p in trainer.model.parameters() if p.ndim == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    nhwc = train(tiny(tmp_path / "b", epochs=1, channels_last=True))
    assert nhwc.summary["channels_last"] is True
    assert nhwc.summary["first_step_loss"] == pytest.approx(nchw.summary["first_step_loss"], rel=1e-5)
    assert nhwc.summary["final_train_loss"] == pytest.approx(nchw.summary["final_train_loss"], rel=1e-3)


def test_channels_last_auto_is_on_for_convolutional_models_only(tmp_path, tiny):
    assert TrainConfig().channels_last == "auto"
    cases = (("simple_cnn", "gn", True), ("cifar_resnet20", "bn", True), ("cifar_resnet20", "ln", True),
             ("mlp", "none", False),
             # GroupNorm with < 8 channels per group is slower in NHWC: instance norm, 16 groups of 1 or 2
             ("cifar_resnet20", "in", False), ("simple_cnn", "gn:8", False), ("simple_cnn", "gn:cpg=8", True))
    for model, norm, expected in cases:
        out = tmp_path / f"{model}-{norm}"
        trainer = Trainer(tiny(out, model=model, norm=norm), out, torch.device("cpu"))
        assert trainer.channels_last is expected, (model, norm)
        conv = [p for p in trainer.model.parameters() if p.ndim == 4 and p.shape[1] > 1]
        assert bool(conv) == (model != "mlp")
        assert all(p.is_contiguous(memory_format=torch.channels_last) is expected for p in conv), (model, norm)
    result = train(tiny(tmp_path / "run", epochs=1))
    assert result.summary["channels_last"] is True


@pytest.mark.parametrize("given, expected", [(["--channels-last"], "on"), (["--no-channels-last"], "off"),
                                             (["--channels-last", "auto"], "auto"), (["--channels-last", "off"], "off"),
                                             ([], "auto")])
def test_channels_last_flag_takes_auto_on_off(capsys, given, expected):
    from reslab.cli import main

    assert main(["train", *given, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["channels_last"] == expected  # quoted: YAML 1.1 reads on as true


def test_channels_last_bad_value_and_earlier_boolean_configs(capsys, tmp_path):
    from reslab.cli import main
    from reslab.config import config_from_dict

    assert main(["train", "--channels-last", "maybe", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'maybe'" in err and "auto, off, on" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert config_from_dict({"channels_last": False}).channels_last == "off"  # config.yaml written before auto
    assert config_from_dict({"channels_last": True}).channels_last == "on"


def test_val_split_evaluates_on_held_out_train_and_reports_its_best_epoch(tmp_path, tiny):
    result = train(tiny(tmp_path / "v", val_split=0.25, epochs=2))
    s = result.summary
    assert s["eval_split"] == "val" and s["best_eval_acc"] == max(r["eval_acc"] for r in metrics(tmp_path / "v"))
    assert s["best_epoch"] in (1, 2)
    data = reslab.load_dataset(SYNTH, val_split=0.25, seed=0)
    assert (data.num_train, data.num_eval) == (144, 48)
    test = train(tiny(tmp_path / "t", epochs=2)).summary
    assert test["eval_split"] == "test" and test["best_eval_acc"] is None  # no selection on the test split


def test_train_step_sends_no_host_tensor_per_step(tmp_path, monkeypatch, tiny):
    """Counts stay on the host side and on the device: no torch.tensor() built per step."""
    calls = []
    real = torch.tensor

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def tensors_per_epoch(train_images):
        dataset = f"synthetic:train={train_images},test=64,size=8,channels=1,classes=4"
        cfg = tiny(tmp_path / f"c{train_images}", dataset=dataset)
        trainer = Trainer(cfg, tmp_path / "c", torch.device("cpu"))

        calls.clear()
        monkeypatch.setattr(torch, "tensor", counting)
        trainer.train_epoch()
        trainer.evaluate()
        monkeypatch.setattr(torch, "tensor", real)
        return len(calls)

    assert tensors_per_epoch(192) == tensors_per_epoch(384)  # 6 vs 12 steps


@pytest.mark.slow
def test_compile_builds_the_train_step_once_and_never_for_eval(tmp_path, monkeypatch, tiny):
    compiles = []

    def backend(gm, example_inputs):
        compiles.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=backend, **kw))
    dataset = "synthetic:train=200,test=64,size=8,channels=1,classes=4"
    counts = {}
    for epochs in (1, 3):
        torch._dynamo.reset()
        compiles.clear()
        # 200 train images at batch 32: 6 full batches and a short one of 8, every epoch
        train(tiny(tmp_path / f"e{epochs}", dataset=dataset, compile=True, epochs=epochs))
        counts[epochs] = len(compiles)
        batch_sizes = {shapes[1][0] for shapes in compiles}  # shapes[1]: the input batch
        assert batch_sizes <= {32, 8}, compiles  # never the eval batch (all 64 test images)
    assert 1 <= counts[1] <= 2  # the full batch, and the short last one
    assert counts[3] == counts[1]  # later epochs reuse them: no recompiles per epoch
    torch._dynamo.reset()
