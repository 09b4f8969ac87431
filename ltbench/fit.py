"""The one training loop of ltbench, and prediction.

Every stage (pre-training, training, classifier retraining) trains through :func:`fit`: set the epoch's lr, let
the hooks prepare the epoch (a deferred re-weighting switching on, synthesis switching off, a progress bar), run the
steps, let the hooks close the epoch (the epoch log, a checkpoint, loggers, running statistics). What a step
computes belongs to the stage's :class:`~ltbench.methods.Method`; the loop only does forward-backward-step and
keeps running sums on the device, so a step never waits for the host: one sync per epoch, and the progress bar
reads the running loss without waiting for the device (:meth:`~ltbench.core.Totals.mean`).

``compile`` (the run's ``compile=`` setting) puts the model's forward, and through AOTAutograd its backward, under
``torch.compile`` (:class:`Compiled`), in training and in evaluation (:func:`predict`). Compiled code runs the
batches of the stage's full size only; a batch of another size (the last, partial batch of an epoch) runs eagerly
through the same module and parameters, so shapes stay static and CUDA graphs ("reduce-overhead") need no padding.

:func:`pack_jobs` chooses how many runs of a sweep share one device (``hydra/launcher=pack``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ltbench.config import ScheduleConfig
from ltbench.core import Batch, Epoch, Hook, Totals, autocast
from ltbench.errors import LtbenchError
from ltbench.optim import lr_at, set_lr

__all__ = [
    "Batch", "Compiled", "Epoch", "Hook", "Totals", "Trainer", "autocast", "check_compile", "fit", "pack_jobs",
    "predict", "train_epoch",
]  # fmt: skip

if TYPE_CHECKING:
    from ltbench.methods import Method
    from ltbench.tasks import Task

log = logging.getLogger("ltbench")


@dataclass
class Trainer:
    """Everything one stage trains with. ``batches(ep)`` yields the epoch's :class:`Batch` es. ``compile``: a
    torch.compile mode of the forward (:data:`ltbench.config.COMPILE_MODES`; "none": eager)."""

    stage: str
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    schedule: ScheduleConfig
    batches: Callable[[Epoch], Iterable[Batch]]
    epoch_gen: Callable[[int], torch.Generator]
    task: Task
    amp: bool
    start_epoch: int = 0
    rows: list[dict] = field(default_factory=list)
    compile: str = "none"
    compiled: Compiled | None = field(default=None, init=False, repr=False)


def fit(tr: Trainer, hooks: list[Hook]) -> None:
    """Train from ``tr.start_epoch`` to the stage's last epoch."""
    hooks = [tr.method, *hooks]
    if tr.compile != "none":  # one clear error before the first step if torch.compile cannot work here
        torch.compiler.reset()  # the stage compiles its own module: no caches, guards or CUDA graphs of another
        check_compile(tr.compile, _device_of(tr.model))
    try:
        for epoch in range(tr.start_epoch, tr.schedule.epochs):
            ep = Epoch(tr.stage, epoch, tr.schedule.epochs, lr_at(epoch, tr.schedule), tr.epoch_gen(epoch), tr.amp)
            set_lr(tr.optimizer, ep.lr)
            stream = tr.batches(ep)  # sets ep.size; draws nothing from ep.gen until iterated
            for h in hooks:
                h.on_epoch_start(ep)
            ep.stats = train_epoch(tr, ep, stream, hooks)
            if not math.isfinite(ep.stats["loss"]):
                raise LtbenchError(
                    f"{tr.stage}: training diverged at epoch {epoch + 1} (loss {ep.stats['loss']}); lower the lr"
                )
            ep.row = epoch_row(tr, ep)
            tr.rows.append(ep.row)
            for h in hooks:
                h.on_epoch_end(ep)
    finally:
        if tr.compiled is not None:  # gradients may live in the CUDA-graph pool: nothing reads them after the stage
            tr.optimizer.zero_grad(set_to_none=True)
            tr.compiled = None


def train_epoch(tr: Trainer, ep: Epoch, stream: Iterable[Batch], hooks: list[Hook]) -> dict[str, float]:
    """One pass over the epoch's batches: forward (the method's step), backward, optimiser step. No host sync: the
    loss and the method's sums are added up on the device and read once, at the end."""
    tr.model.train()
    if tr.compile != "none" and tr.compiled is None:
        tr.compiled = Compiled(tr.model, tr.compile, f"the {tr.stage} stage's model")
    totals = Totals()
    t0 = time.perf_counter()
    for batch in stream:
        n = len(batch)
        if n < 2:  # a batch of one breaks BatchNorm; it is at most one sample an epoch
            continue
        net = tr.model if tr.compiled is None else tr.compiled.pick(n)
        with _first_compiled_call(tr.compiled, net):
            loss, sums = tr.method.step(net, batch, ep)
            tr.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # (a compiled forward's backward is compiled at its first call)
        tr.optimizer.step()
        totals.add(n, {"loss": loss.detach().double() * n, **sums})
        for h in hooks:
            h.after_step(ep, totals)
    sums = totals.values()
    seconds = time.perf_counter() - t0
    seen = max(totals.seen, 1)
    return {
        "loss": sums.get("loss", float("nan")) / seen,
        "metric": tr.task.epoch_metric(sums, totals.seen),
        "images": totals.seen,
        "seconds": seconds,
        **{k: v / seen for k, v in sums.items() if k.startswith("mean_")},
    }


def epoch_row(tr: Trainer, ep: Epoch) -> dict[str, Any]:
    """The epoch's line of the stage's epoch log (epoch is 1-based)."""
    s = ep.stats
    return {
        "epoch": ep.index + 1,
        "lr": ep.lr,
        "train_loss": round(s["loss"], 6),
        tr.task.train_metric: round(s["metric"], 4),
        "images": int(s["images"]),
        "seconds": round(s["seconds"], 3),
        "images_per_s": round(s["images"] / max(s["seconds"], 1e-9), 1),
        **{k[len("mean_") :]: round(v, 6) for k, v in s.items() if k.startswith("mean_")},
        **tr.method.row_extras(ep),
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    amp: bool,
    features: bool = False,
    on_batch: Callable[[int], Any] | None = None,
    compile: str = "none",
) -> torch.Tensor:
    """Model outputs (or backbone features) of every batch, in order, float32 on the CPU.

    Outputs are copied to the host without waiting (pinned memory) and the device is synchronised once, at the
    end. ``compile``: the forward under torch.compile for batches of the first batch's size (the last, smaller
    batch runs eagerly); if compilation fails, a warning and eager evaluation: the numbers do not depend on it.
    """
    model.eval()
    eager: Callable[[torch.Tensor], torch.Tensor] = model.features if features else model  # type: ignore[assignment]
    fast = Compiled(eager, compile, "the evaluation forward") if compile != "none" else None
    out: list[torch.Tensor] = []
    device = None
    for b in batches:
        device = b.x.device
        f = eager if fast is None else fast.pick(len(b))
        try:
            with _first_compiled_call(fast, f), autocast(device, amp):
                o = f(b.x)
        except LtbenchError as e:
            log.warning("%s; evaluating eagerly", e)
            fast = None
            with autocast(device, amp):
                o = eager(b.x)
        out.append(o.float().to("cpu", non_blocking=device.type == "cuda"))
        if on_batch is not None:
            on_batch(len(b))
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # the non-blocking copies have landed
    return torch.cat(out) if out else torch.zeros(0)


# ------------------------------------------------------------------------------------------------ torch.compile

# Modes whose compiled code replays CUDA graphs on CUDA (torch._inductor.list_mode_options).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class Compiled:
    """``torch.compile`` of a module's forward (or any callable) for batches of one size.

    The first batch fixes the size (an epoch's batches are full but the last); :meth:`pick` returns the compiled
    callable for that size and the eager one otherwise, so the compiled graph never sees a second shape
    (``dynamic=False``: no recompilation, and CUDA graphs need static shapes). Both share the module's parameters
    and buffers. In CUDA-graph modes every compiled call starts a new step
    (``torch.compiler.cudagraph_mark_step_begin``): the previous step's outputs may be overwritten, which is safe
    because the loop has used them (loss, running sums, gradients) before the next forward.
    """

    def __init__(self, eager: Callable, mode: str, what: str) -> None:
        self.eager, self.mode, self.what = eager, mode, what
        self.fast = torch.compile(eager, mode=None if mode == "default" else mode, dynamic=False)
        self.size: int | None = None
        self.ok = False  # a compiled call has succeeded (compilation errors surface at the first)

    def pick(self, n: int) -> Callable:
        if self.size is None:
            self.size = n
        if n != self.size:
            return self.eager
        if self.mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        return self.fast


@contextmanager
def _first_compiled_call(compiled: Compiled | None, fn: Any) -> Iterator[None]:
    """Around the first call of compiled code: an error of torch.compile becomes one line (LtbenchError)."""
    if compiled is None or compiled.ok or fn is not compiled.fast:
        yield
        return
    try:
        yield
    except Exception as e:
        if not _compiler_error(e):
            raise
        raise LtbenchError(
            f"compile={compiled.mode}: torch.compile failed on {compiled.what} ({_first_line(e)}); "
            "run with compile=none"
        ) from e
    compiled.ok = True


def _compiler_error(e: BaseException | None) -> bool:
    """An error raised by torch.compile's machinery (dynamo, inductor, a C++/Triton compiler), not by the model."""
    while e is not None:
        if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return True
        e = e.__cause__
    return False


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * 2 + 1


_COMPILE_WORKS: dict[str, str | None] = {}  # device type -> None (works) or why not


def check_compile(mode: str, device: torch.device) -> None:
    """Raise one clear :class:`LtbenchError` unless torch.compile works on ``device`` (inductor needs a C++ compiler
    for CPU code and Triton for CUDA code): a tiny function is compiled and run once per process and device type,
    so a run without a working compiler stops before its first step rather than with a traceback inside it."""
    if device.type not in _COMPILE_WORKS:
        try:
            x = torch.arange(8.0, device=device)
            ok = torch.equal(torch.compile(_probe, dynamic=False)(x), _probe(x))
            _COMPILE_WORKS[device.type] = None if ok else "the compiled probe gave wrong numbers"
        except Exception as e:
            _COMPILE_WORKS[device.type] = _first_line(e)
    why = _COMPILE_WORKS[device.type]
    if why is not None:
        raise LtbenchError(
            f"compile={mode}: torch.compile does not work on {device.type} here ({why}); install a C++ compiler "
            "(gcc/g++) for CPU or Triton for CUDA, or run with compile=none"
        )


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------- packing runs onto one device

# Parameters below which one run leaves a GPU mostly idle at CIFAR resolution (batch 128): the step is bound by
# kernel launches and Python, not arithmetic. ResNet-32 (0.46M) and WRN-28-2 (1.5M) pack 8 to a GPU; a
# 224-pixel network or an image-file dataset fills the device (and the CPUs decoding JPEGs) alone.
PACK_RULE = ((2_000_000, 8), (8_000_000, 4), (30_000_000, 2))
CORES_PER_JOB = 2  # one core for a run's Python loop and kernel launches, one for its data and the rest


def pack_jobs(num_params: int | None, *, image_files: bool, cores: int) -> int:
    """How many runs share one device: by model size (:data:`PACK_RULE`), at most ``cores // CORES_PER_JOB`` so
    that each run keeps two cores (joblib gives each worker ``cores // n_jobs`` threads), at least 1. One run for
    image-file datasets (JPEG decoding already takes the CPUs) and for a model of unknown size."""
    if image_files or num_params is None:
        return 1
    by_size = next((n for limit, n in PACK_RULE if num_params < limit), 1)
    return max(1, min(by_size, cores // CORES_PER_JOB))


def _pack_resolver(model: Any, dataset: Any) -> int:
    """``${ltbench_pack:${model},${dataset}}``: :func:`pack_jobs` for a composed config (its model is built on the
    meta device, so counting parameters allocates nothing)."""
    from ltbench.models import build_model

    image_files = "image_size" in dataset  # ImageNet-LT, Places-LT, folders: decoded from files by workers
    try:
        cfg = OmegaConf.to_object(model)
        with torch.device("meta"):
            net = build_model(cfg, int(dataset.get("num_classes", 10) or 10), None)  # type: ignore[arg-type]
        params: int | None = sum(p.numel() for p in net.parameters())
    except Exception:  # a model that needs its data to be built (text, tabular): no estimate
        params = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = pack_jobs(params, image_files=image_files, cores=cores)
    log.info("hydra/launcher=pack: %d runs at a time (model %s, %s parameters)", n, model.get("name"), params)
    return n


OmegaConf.register_new_resolver("ltbench_pack", _pack_resolver, replace=True)
