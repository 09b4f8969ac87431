"""Methods: what a stage trains with, behind one declared contract.

A :class:`Method` computes the loss of a batch (``step``) and may own parameters (a projection head, a rotation
head, a weight network, an EMA teacher) and per-epoch state; it is also a :class:`~ltbench.core.Hook`, so it can
switch things on at an epoch (deferred re-weighting), update running statistics after a step (an EMA) or act when
its stage starts and ends. What it needs from the stage is declared as class attributes, never probed:

- ``inputs``: what the feed hands over: ``"normalized"`` (augmented and normalised, the default) or ``"raw"`` (the
  uint8 images as stored, for methods that make their own views);
- ``streams``: the data streams beside the labeled stream of the stage's sampler (:class:`Streams`: an unlabeled
  stream, sized per step by :meth:`Method.unlabeled_batch`);
- ``param_groups()``: optimiser groups for the method's own parameters and, with an lr factor or a weight decay of
  their own, for model parameters too (one mechanism, exact for any optimiser);
- ``no_decay(net)``: more parameter names of the trained module without weight decay; ``release()``: undo what the
  method attached to the network, when the stage ends (also after an error or an interrupt).

Registries: :data:`PRETRAIN` (the pre-training stage: ``pretrain=rotation``), :data:`METHODS` (methods that change
how the training stage trains, built on its supervised method: ``method=fds``) and :data:`SEMI` (semi-supervised
methods joining the training stage: ``semi=fixmatch``); the supervised training method is
:class:`~ltbench.methods.supervised.Supervised`. Every builder has one signature, :data:`Builder`:
``builder(cfg, ctx, model, base)`` with the option's config, the stage's typed
:class:`~ltbench.contracts.StageContext`, the network and the method it builds on (None where there is none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from ltbench.config import MethodConfig, PretrainConfig, SemiConfig
from ltbench.core import Batch, Epoch, Hook
from ltbench.optim import ParamGroup
from ltbench.registry import Registry

if TYPE_CHECKING:
    from ltbench.contracts import StageContext

Inputs = Literal["normalized", "raw"]


@dataclass(frozen=True)
class Streams:
    """The data streams a method consumes beside the labeled stream of its stage's sampler.

    ``unlabeled``: each labeled batch comes with a batch of the unlabeled set (``Batch.unlabeled``: uint8 images,
    their true labels for measuring pseudo-labels only, their indices), a seeded permutation per epoch, cycled;
    :meth:`Method.unlabeled_batch` gives its size. ``validation``: the method draws batches of the validation split
    itself, through ``ctx.feed.split_batch("val", ...)`` (any data kind), e.g. a meta set.
    """

    unlabeled: bool = False
    validation: bool = False


class Builder(Protocol):
    """How every registry of methods builds an option (a class or a function)."""

    def __call__(self, cfg: Any, ctx: StageContext, model: nn.Module, base: Method | None) -> Method: ...


PRETRAIN: Registry[Builder] = Registry("pretrain", PretrainConfig)
METHODS: Registry[Builder] = Registry("method", MethodConfig)
SEMI: Registry[Builder] = Registry("semi", SemiConfig)

__all__ = ["METHODS", "PRETRAIN", "SEMI", "Builder", "Extension", "Method", "MethodConfig", "Streams"]


class Method(nn.Module, Hook):
    """Base class. Subclasses implement :meth:`step`; the rest has defaults that change nothing."""

    inputs: ClassVar[Inputs] = "normalized"
    streams: ClassVar[Streams] = Streams()

    def step(self, model: nn.Module, batch: Batch, ep: Epoch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch and the per-batch sums to keep (device tensors; ``mean_<name>`` sums are logged as
        per-sample means)."""
        raise NotImplementedError

    def unlabeled_batch(self, batch_size: int, num_labeled: int, num_unlabeled: int) -> int:
        """Unlabeled images per step, for a labeled batch of ``batch_size`` (methods with ``streams.unlabeled``)."""
        raise NotImplementedError(f"{type(self).__name__} declares an unlabeled stream but no unlabeled_batch()")

    def param_groups(self) -> list[ParamGroup]:
        """Optimiser groups: by default one group of the method's own trainable parameters.

        A group may hold parameters of the trained module: with its own ``lr_scale``, ``weight_decay`` or
        ``fixed_lr`` it takes them out of the model's groups (a classifier fine-tuned at 0.1 x the lr); a group with
        the defaults leaves them to the model's groups (and their ``no_decay`` patterns)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroup("method", params)] if params else []

    def no_decay(self, net: nn.Module) -> list[str]:
        """More parameter-name patterns of the trained module (``wrap(net)``) trained without weight decay."""
        return []

    def release(self) -> None:
        """Undo what the method attached to the network (hooks); called when its stage ends, whatever the end."""

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


class Extension(Method):
    """A method built on the stage's supervised method ``base`` (its loss, re-weighting and synthesis), which adds a
    term of its own: the epoch start, the optimiser groups and the epoch log's columns are the base's."""

    def __init__(self, base: Method | None, what: str) -> None:
        super().__init__()
        if base is None:
            from ltbench.errors import ConfigError

            raise ConfigError(f"{what} builds on the stage's supervised method")
        self.base = base

    def on_epoch_start(self, ep: Epoch) -> None:
        self.base.on_epoch_start(ep)

    def param_groups(self) -> list[ParamGroup]:
        return self.base.param_groups()

    def row_extras(self, ep: Epoch) -> dict[str, Any]:
        return self.base.row_extras(ep)
