"""Optimisers and learning-rate schedules from a stage's :class:`~ltbench.config.ScheduleConfig`.

The optimiser is built over parameter groups: the trainable parameters of the model, split by
``schedule.no_decay`` (parameter-name patterns trained without weight decay), and the groups a method adds for its
own parameters (a projector, a weight network, a loss with a learnable scale), each with an optional lr scale and
weight decay. Every epoch the schedule sets ``group["lr"] = lr_at(epoch) * group["lr_scale"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import nn

from ltbench.config import ScheduleConfig


@dataclass
class ParamGroup:
    """Parameters trained together; ``weight_decay`` None uses the schedule's; ``fixed_lr``: a constant lr that the
    schedule does not change (Balanced MSE's noise scale, as in its reference code)."""

    name: str
    params: list[torch.nn.Parameter] = field(default_factory=list)
    lr_scale: float = 1.0
    weight_decay: float | None = None
    fixed_lr: float | None = None


def model_groups(
    model: nn.Module, no_decay: list[str], prefix: str = "", exclude: set[int] | None = None
) -> list[ParamGroup]:
    """The model's trainable parameters in registration order; names matching ``no_decay`` get no weight decay.

    A pattern matches a name or the name's tail after a dot (``head.bias`` matches ``model.head.bias``), so the
    patterns of a loss or a schedule still find their parameters when a method wraps the model in its own module.
    """
    decay, plain = ParamGroup(f"{prefix}params"), ParamGroup(f"{prefix}no_decay", weight_decay=0.0)
    for name, p in model.named_parameters():
        if p.requires_grad and (exclude is None or id(p) not in exclude):
            hit = any(fnmatch(name, pat) or fnmatch(name, f"*.{pat}") for pat in no_decay)
            (plain if hit else decay).params.append(p)
    return [g for g in (decay, plain) if g.params]


def overrides(g: ParamGroup) -> bool:
    """Whether a group sets its own lr or weight decay (then it owns its parameters wherever they live)."""
    return g.lr_scale != 1.0 or g.weight_decay is not None or g.fixed_lr is not None


def stage_groups(module: nn.Module, no_decay: list[str], method_groups: list[ParamGroup]) -> list[ParamGroup]:
    """The optimiser groups of a stage that trains ``module`` with a method's ``method_groups``.

    One rule for every parameter, whatever the optimiser: a method group with its own lr factor, weight decay or
    fixed lr (:func:`overrides`) trains its parameters, taken out of the model's groups even where ``module`` holds
    them (a classifier at 0.5 x the lr); a method group with the defaults only adds parameters ``module`` does not
    hold (a projector inside a wrapped module stays in the model's groups, with their ``no_decay`` patterns). Order:
    the model's groups, then the method's, in the order given; a parameter is in exactly one group.
    """
    owned = {id(p) for g in method_groups if overrides(g) for p in g.params}
    groups = model_groups(module, no_decay, exclude=owned)
    in_module = {id(p) for p in module.parameters()}
    for g in method_groups:
        if not overrides(g):
            g = ParamGroup(g.name, [p for p in g.params if id(p) not in in_module], g.lr_scale, g.weight_decay,
                           g.fixed_lr)  # fmt: skip
        groups.append(g)
    return groups


def build_optimizer(sched: ScheduleConfig, groups: list[ParamGroup]) -> torch.optim.Optimizer:
    """The schedule's optimiser over ``groups`` (empty groups are dropped)."""
    param_groups = [
        {
            "params": g.params,
            "name": g.name,
            "lr": sched.lr * g.lr_scale if g.fixed_lr is None else g.fixed_lr,
            "lr_scale": g.lr_scale,
            "fixed_lr": g.fixed_lr,
            "weight_decay": sched.weight_decay if g.weight_decay is None else g.weight_decay,
        }
        for g in groups
        if g.params
    ]
    if sched.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=sched.lr, momentum=sched.momentum, nesterov=sched.nesterov)
    cls = torch.optim.Adam if sched.optimizer == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=sched.lr, betas=tuple(sched.betas), eps=sched.eps)  # type: ignore[arg-type]


def lr_at(epoch: int, sched: ScheduleConfig) -> float:
    """Learning rate of a (0-indexed) epoch: linear warm-up to lr, as in the CIFAR-LT reference, then step decay
    (x gamma from each milestone on) or cosine decay to 0; warm-up and milestones are fractions of the epochs."""
    base, warmup = sched.lr, sched.warmup_epochs
    if epoch < warmup:  # epoch e of a W-epoch warm-up gets lr * (e+1)/W
        return base * (epoch + 1) / warmup
    if sched.decay == "cosine":
        span = max(sched.epochs - warmup, 1)
        return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))
    if sched.decay == "fixmatch":  # Sohn et al. 2020: lr * cos(7 pi k / (16 K))
        return base * math.cos(7 * math.pi * (epoch - warmup) / (16 * max(sched.epochs - warmup, 1)))
    return base * sched.gamma ** sum(epoch >= m for m in sched.milestone_epochs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0) if g.get("fixed_lr") is None else g["fixed_lr"]
