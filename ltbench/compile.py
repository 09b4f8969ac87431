"""torch.compile for ltbench's loops: the compiled forward of one batch size, and a clear error when it cannot work.

``compile`` (the run's ``compile=`` setting) puts the model's forward, and through AOTAutograd its backward, under
``torch.compile`` (:class:`Compiled`), in training (:func:`ltbench.fit.train_epoch`) and in evaluation
(:func:`ltbench.fit.predict`). Compiled code runs the batches of the stage's full size only; a batch of another size
(the last, partial batch of an epoch) runs eagerly through the same module and parameters, so shapes stay static
and CUDA graphs ("reduce-overhead") need no padding.

Invariants: the compiled callable never sees a second input shape (``dynamic=False``, no recompilation); an error
of torch.compile's machinery (dynamo, inductor, a C++ / Triton compiler) becomes one :class:`LtbenchError` line at
the first compiled call (:func:`first_compiled_call`), an error of the model itself propagates unchanged; whether
torch.compile works at all is probed once per process and device type (:func:`check_compile`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ltbench.errors import LtbenchError

__all__ = ["CUDA_GRAPH_MODES", "Compiled", "check_compile", "device_of", "first_compiled_call"]

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
        self.graphs = mode in CUDA_GRAPH_MODES

    def pick(self, n: int) -> Callable:
        if self.size is None:
            self.size = n
        if n != self.size:
            return self.eager
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.fast


@contextmanager
def first_compiled_call(compiled: Compiled | None, fn: Any) -> Iterator[None]:
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
            f"compile={compiled.mode}: torch.compile failed on {compiled.what} ({first_line(e)}); run with compile=none"
        ) from e
    compiled.ok = True


def _compiler_error(e: BaseException | None) -> bool:
    """An error raised by torch.compile's machinery (dynamo, inductor, a C++/Triton compiler), not by the model."""
    while e is not None:
        if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return True
        e = e.__cause__
    return False


def first_line(e: BaseException) -> str:
    """``Type: first non-empty line of the message``, at most 300 characters."""
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
            _COMPILE_WORKS[device.type] = first_line(e)
    why = _COMPILE_WORKS[device.type]
    if why is not None:
        raise LtbenchError(
            f"compile={mode}: torch.compile does not work on {device.type} here ({why}); install a C++ compiler "
            "(gcc/g++) for CPU or Triton for CUDA, or run with compile=none"
        )


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module without tensors)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
