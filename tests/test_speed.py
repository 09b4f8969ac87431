"""Speed settings that must not change what a run computes: ``compile=`` (torch.compile around the training and
evaluation forward) and packing several runs of a sweep onto one device (``hydra/launcher=pack``).

No timings here (they live in scripts/bench_throughput.py and scripts/bench_packing.py); these tests check that
compiled training gives eager's losses, that a partial batch runs eagerly, that torch.compile failing is one line
before any step, that ``compile`` is an execution setting (not in the run's identity), and that a packed sweep gives
every run its own directory and thread count while a failing run leaves the others alone.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import SMOKE
from hydra import compose, initialize_config_module
from torch import nn

import ltbench.compile as compile_mod
import ltbench.fit as fit_mod
from ltbench.config import ScheduleConfig, to_schema
from ltbench.core import Batch, Epoch, Hook
from ltbench.errors import ConfigError, LtbenchError
from ltbench.fit import Compiled, Trainer, check_compile, fit, predict
from ltbench.identity import changes_result, config_hash
from ltbench.launcher import pack_jobs
from ltbench.losses.classification import CrossEntropy
from ltbench.methods.supervised import Supervised
from ltbench.optim import build_optimizer, model_groups
from ltbench.tasks.classification import Classification, ClassificationConfig


@pytest.fixture(scope="module")
def hydra_compose():
    with initialize_config_module("ltbench.conf", version_base="1.3"):
        yield lambda *o, **k: compose("train", overrides=list(o), **k)


@pytest.fixture(scope="module")
def compose_cfg(hydra_compose):
    return lambda *o: hydra_compose(*SMOKE, *o)


# ------------------------------------------------------------------------------------- compile: configuration


def test_compile_is_an_execution_setting(compose_cfg):
    base = to_schema(compose_cfg())
    assert base.compile == "none"  # default off: CPU runs stay bit-reproducible
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        cfg = to_schema(compose_cfg(f"compile={mode}"))
        assert cfg.compile == mode and config_hash(cfg) == config_hash(base)  # same run, same directory hash
    assert changes_result(base, "compile=reduce-overhead") is False  # resume accepts it
    assert to_schema(compose_cfg("compile=true")).compile == "default"
    assert to_schema(compose_cfg("compile=false")).compile == "none"
    with pytest.raises(ConfigError, match="compile must be one of"):
        to_schema(compose_cfg("compile=fast"))


# ------------------------------------------------------------------------------------- compile: the loop


class Steps(Hook):
    def __init__(self):
        self.steps = 0

    def after_step(self, ep, totals):
        self.steps += 1


def _trainer(mode: str, epochs: int = 2) -> Trainer:
    """A tiny conv net with BatchNorm (its running statistics are mutated inside the compiled graph) trained with
    ltbench's supervised method and SGD; 3 batches an epoch: 8, 8 and a partial batch of 6."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )  # fmt: skip
    x, y = torch.randn(22, 3, 8, 8), torch.arange(22) % 3
    task = Classification(ClassificationConfig())
    method = Supervised(CrossEntropy([8, 7, 7]), task)
    sched = ScheduleConfig(epochs=epochs, lr=0.05, warmup=0.0, milestones=[])

    def batches(ep: Epoch):
        ep.size = len(y)
        order = torch.randperm(len(y), generator=ep.gen)
        return (Batch(x[order[i : i + 8]], y[order[i : i + 8]]) for i in range(0, len(y), 8))

    opt = build_optimizer(sched, model_groups(model, []))
    gen = lambda e: torch.Generator().manual_seed(e)  # noqa: E731
    return Trainer("train", model, method, opt, sched, batches, gen, task, amp=False, compile=mode)


def _inductor_or_skip() -> None:
    try:
        check_compile("default", torch.device("cpu"))
    except LtbenchError as e:
        pytest.skip(f"torch.compile cannot compile here: {e}")


def test_compiled_training_gives_eager_losses_and_runs_the_partial_batch_eagerly(monkeypatch):
    """Same data, same seeds: the per-epoch losses and the trained weights of compile=default match eager's up to
    float reassociation in the generated kernels; full batches go through the compiled forward, the partial one
    (6 of 8) through the module itself."""
    _inductor_or_skip()
    calls = []
    real_pick = Compiled.pick

    def pick(self, n):
        f = real_pick(self, n)
        calls.append((n, f is self.fast))
        return f

    monkeypatch.setattr(Compiled, "pick", pick)
    eager, compiled = _trainer("none"), _trainer("default")
    fit(eager, [])
    fit(compiled, [Steps()])
    assert calls == [(8, True), (8, True), (6, False)] * 2
    for a, b in zip(eager.rows, compiled.rows):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-5)
        assert b["train_acc"] == a["train_acc"]
    for (name, p), q in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), rtol=1e-4, atol=1e-5), name
    assert compiled.compiled is None and all(p.grad is None for p in compiled.model.parameters())
    # evaluation: compiled forward for full batches, eager for the last; outputs equal eager's
    xs = torch.randn(20, 3, 8, 8)
    batches = [Batch(xs[i : i + 8], torch.zeros(len(xs[i : i + 8]), dtype=torch.long)) for i in range(0, 20, 8)]
    plain = predict(compiled.model, batches, amp=False)
    fast = predict(compiled.model, batches, amp=False, compile="default")
    assert fast.shape == (20, 3) and torch.allclose(fast, plain, rtol=1e-4, atol=1e-5)


class _InductorFailure(RuntimeError):
    """Stands for an inductor error (no C++ compiler, a lowering failure): its module is inductor's."""


_InductorFailure.__module__ = "torch._inductor.exc"


def _failing_compile(*args, **kwargs):
    def compiled(*a, **k):
        raise _InductorFailure("InvalidCxxCompiler: No working C++ compiler found\n  long traceback text")

    return compiled


def test_no_working_compiler_is_one_line_before_the_first_step(monkeypatch):
    monkeypatch.setattr(compile_mod, "_COMPILE_WORKS", {})
    monkeypatch.setattr(torch, "compile", _failing_compile)
    tr, steps = _trainer("reduce-overhead"), Steps()
    with pytest.raises(LtbenchError) as err:
        fit(tr, [steps])
    msg = str(err.value)
    assert steps.steps == 0 and tr.rows == []
    assert "\n" not in msg and msg.startswith("compile=reduce-overhead: torch.compile does not work on cpu")
    assert "No working C++ compiler" in msg and "compile=none" in msg


def test_a_model_that_fails_to_compile_is_one_line_at_the_first_step_and_evaluation_falls_back(monkeypatch):
    monkeypatch.setattr(compile_mod, "_COMPILE_WORKS", {"cpu": None})  # the probe passed; this model does not
    monkeypatch.setattr(torch, "compile", _failing_compile)
    tr = _trainer("default")
    with pytest.raises(LtbenchError, match=r"^compile=default: torch\.compile failed on the train stage's model"):
        fit(tr, [])
    assert tr.rows == []
    # a model error under compile is not disguised as a compile error
    monkeypatch.setattr(torch, "compile", lambda f, **k: lambda *a: (_ for _ in ()).throw(ValueError("shape")))
    with pytest.raises(ValueError, match="shape"):
        fit(_trainer("default"), [])
    # evaluation never loses a trained run to the compiler: a warning, then eager outputs
    monkeypatch.setattr(torch, "compile", _failing_compile)
    model, xs = tr.model, torch.randn(10, 3, 8, 8)
    batches = [Batch(xs[:8], torch.zeros(8, dtype=torch.long)), Batch(xs[8:], torch.zeros(2, dtype=torch.long))]
    assert torch.equal(predict(model, batches, amp=False, compile="default"), predict(model, batches, amp=False))


def test_a_run_with_compile_trains_and_evaluates_every_stage_through_it(
    compose_cfg, cifar10_root, tmp_path, monkeypatch
):
    """compile= reaches the loop of every stage (here train and crt's classifier stage) and every evaluation;
    torch.compile is replaced by the identity, so this checks the wiring, not inductor."""
    from ltbench.runner import run

    monkeypatch.setattr(compile_mod, "_COMPILE_WORKS", {})
    monkeypatch.setattr(torch, "compile", lambda f, **k: f)
    seen: list[str] = []
    real_init = Compiled.__init__

    def init(self, eager, mode, what):
        seen.append(what)
        real_init(self, eager, mode, what)

    monkeypatch.setattr(Compiled, "__init__", init)
    fixture = [f"dataset.root={cifar10_root}", "dataset.download=false", "dataset.imbalance_ratio=10"]
    m = run(compose_cfg("strategy=crt", "compile=max-autotune", *fixture, f"results_dir={tmp_path}"), tmp_path / "r")
    assert m["status"] == "completed" and m["compile"] == "max-autotune"
    assert "the train stage's model" in seen and "the classifier stage's model" in seen
    assert "the evaluation forward" in seen


def test_running_totals_are_read_once_an_epoch():
    """No host sync in a step: Totals.values() is the one read per epoch (Totals.mean serves the progress bar and
    is exact off CUDA)."""
    reads = {"n": 0}
    real = fit_mod.Totals.values

    def counted(self):
        reads["n"] += 1
        return real(self)

    fit_mod.Totals.values = counted
    try:
        fit(_trainer("none", epochs=3), [])
    finally:
        fit_mod.Totals.values = real
    assert reads["n"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the lagging read of the running loss")
def test_running_loss_for_display_does_not_wait_on_cuda():
    t = fit_mod.Totals()
    t.add(2, {"loss": torch.tensor(4.0, device="cuda", dtype=torch.float64)})
    assert t.mean("loss") == 2.0  # the first read of an epoch waits once
    t.add(2, {"loss": torch.tensor(8.0, device="cuda", dtype=torch.float64)})
    first = t.mean("loss")  # starts a copy, shows the last value read
    torch.cuda.synchronize()
    assert first == 2.0 and t.mean("loss") == 3.0


# -------------------------------------------------------------------------------------------------- packing


def test_pack_rule():
    # ResNet-32 (0.46M parameters) and WRN-28-2 (1.5M): 8 to a GPU, if the CPUs allow two cores each
    assert pack_jobs(464_154, image_files=False, cores=16) == 8
    assert pack_jobs(1_467_610, image_files=False, cores=8) == 4
    assert pack_jobs(4_900_000, image_files=False, cores=16) == 4
    assert pack_jobs(23_528_522, image_files=False, cores=16) == 2  # ResNet-50 on CIFAR
    assert pack_jobs(60_000_000, image_files=False, cores=64) == 1
    assert pack_jobs(464_154, image_files=True, cores=16) == 1  # JPEG decoding takes the CPUs
    assert pack_jobs(None, image_files=False, cores=16) == 1
    assert pack_jobs(464_154, image_files=False, cores=1) == 1


def _joblib_or_skip() -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install hydra-joblib-launcher")


def test_pack_launcher_chooses_jobs_from_the_model(hydra_compose, monkeypatch):
    _joblib_or_skip()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)

    def launcher(*o):
        return hydra_compose("hydra/launcher=pack", *o, return_hydra_config=True).hydra.launcher

    assert launcher().n_jobs == 8  # ResNet-32 on CIFAR-10-LT, 16 cores
    assert launcher()._target_.endswith("JoblibLauncher") and launcher().batch_size == "1"
    assert launcher("model=resnet50").n_jobs == 2
    assert launcher("dataset=imagenetlt", "model=resnet50").n_jobs == 1
    assert launcher("hydra.launcher.n_jobs=3").n_jobs == 3  # the user's choice wins


@pytest.mark.slow
def test_packed_sweep_runs_jobs_apart_and_survives_a_failing_job(cifar10_root, tmp_path):
    """Two jobs at a time: each run has its own directory and cores // 2 threads; a job whose data is missing is
    recorded as failed while the others complete, and the sweep exits non-zero."""
    _joblib_or_skip()
    from test_e2e import ltbench

    r = ltbench(
        "train", "-m", "hydra/launcher=pack", "hydra.launcher.n_jobs=2", *SMOKE,
        f"dataset.root={cifar10_root},{tmp_path / 'missing'}", "dataset.download=false", "dataset.imbalance_ratio=10",
        "seed=0,1", f"results_dir={tmp_path}", cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert r.returncode != 0
    recs = {p.parent: json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")}
    assert len(recs) == 4  # four run directories, none shared
    done = [x for x in recs.values() if x["status"] == "completed"]
    assert sorted(x["seed"] for x in done) == [0, 1]
    assert sorted(x["status"] for x in recs.values()) == ["completed", "completed", "failed", "failed"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert {x["num_threads"] for x in done} == {max(1, cores // 2)}  # joblib's OMP_NUM_THREADS per worker
