"""Model registry: short names resolved to constructors, so saved configs stay stable when code moves."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ltbench.config import ModelConfig
from ltbench.errors import ConfigError
from ltbench.models.resnet_cifar import CifarResNet
from ltbench.models.torchvision_nets import TorchvisionNet

MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "resnet32": lambda cfg, c: CifarResNet(cfg.depth, cfg.width, c, cfg.head),
    "cifar_resnet": lambda cfg, c: CifarResNet(cfg.depth, cfg.width, c, cfg.head),
    "resnet10": lambda cfg, c: TorchvisionNet("resnet10", c, cfg.head),
    "resnet50": lambda cfg, c: TorchvisionNet("resnet50", c, cfg.head),
    "resnext50": lambda cfg, c: TorchvisionNet("resnext50", c, cfg.head),
}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[cfg.name](cfg, num_classes)
