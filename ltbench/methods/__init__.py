"""Methods: what a stage trains with.

A :class:`Method` computes the loss of a batch (``step``) and may own parameters (a projection head, a rotation
head, a weight network, an EMA teacher) and per-epoch state; it is also a :class:`~ltbench.fit.Hook`, so it can
switch things on at an epoch (deferred re-weighting) or update running statistics after a step (an EMA). The
optimiser of its stage is built over the model's trainable parameters and the groups :meth:`Method.param_groups`
adds.

Registries: :data:`PRETRAIN` (the pre-training stage: ``pretrain=rotation``), :data:`METHODS` (methods that change
how the training stage trains, built on its supervised method: ``method=fds``) and :data:`SEMI` (semi-supervised
methods joining the training stage: ``semi=fixmatch``); the supervised training method is
:class:`~ltbench.methods.supervised.Supervised`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ltbench.config import MethodConfig, PretrainConfig, SemiConfig
from ltbench.core import Batch, Epoch, Hook
from ltbench.optim import ParamGroup
from ltbench.registry import Registry

PRETRAIN: Registry[Any] = Registry("pretrain", PretrainConfig)
METHODS: Registry[Any] = Registry("method", MethodConfig)
SEMI: Registry[Any] = Registry("semi", SemiConfig)

__all__ = ["METHODS", "PRETRAIN", "SEMI", "Method", "MethodConfig"]


class Method(nn.Module, Hook):
    """Base class. Subclasses implement :meth:`step`; the rest has sensible defaults."""

    #: extra augmented views of each training image the method needs (contrastive methods: 1 more)
    extra_views = 0

    def step(self, model: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch and the per-batch sums to keep (device tensors; ``mean_<name>`` sums are logged as
        per-sample means)."""
        raise NotImplementedError

    def param_groups(self) -> list[ParamGroup]:
        """Groups of the method's own trainable parameters (default: one group of all of them)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroup("method", params)] if params else []

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        """Extra columns of the epoch log."""
        return {}

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the stage optimises (and wraps in DDP): the model itself, or the model with the method's own
        heads when the method's forward is not the model's (a rotation head on the features, say)."""
        return model

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The network to evaluate after the stage (an EMA copy for methods that keep one)."""
        return model

    def summary(self) -> dict[str, Any]:
        """What the stage's record keeps about the method (e.g. pseudo-label quality)."""
        return {}
