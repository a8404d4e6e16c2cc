"""Which backend, device and dtype run an edit: chosen once, here.

:func:`make_backend` turns ``--backend`` (``torch``, ``onnxruntime``, ``tensorrt``, ``auto``)
into a :class:`~p2v_fast.nets.backends.Backend`; :func:`load_runtime` loads the models and the
backends an :class:`~p2v_fast.config.EditConfig` asks for; :func:`inversion_runtime` says where
the inversion runs (its own precision, ``--invert-dtype``). The edit loop never asks which
runtime it is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2v_fast.config import EditConfig, resolve_device, warn_if_policy_late
from p2v_fast.errors import EngineError, InputError
from p2v_fast.nets.backends import Backend, TorchBackend, runtime_identity


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass
class Runtime:
    """Loaded models and the backends that run them."""

    models: Any  # p2v_fast.weights.models.Models
    backend: Backend
    grad_backend: Backend | None
    warned: set[tuple[str, str]] = field(default_factory=set)  # prompts already warned about (too long)


def load_runtime(cfg: EditConfig) -> Runtime:
    from p2v_fast.weights.models import load_models

    warn_if_policy_late()  # torch loaded before p2v_fast: its OpenMP threads spin (a warning, once)
    if cfg.backend == "tensorrt":  # before loading anything: say why TensorRT cannot run here
        from p2v_fast.nets.system import require_tensorrt

        require_tensorrt("use --backend onnxruntime or torch")
    device = resolve_device(cfg.device)
    invert_precision(cfg.invert_dtype, device)  # --invert-dtype tf32 off CUDA: refused before the models load
    return runtime_for(cfg, load_models(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device)))


def runtime_for(cfg: EditConfig, models) -> Runtime:
    """The backends ``cfg`` asks for, running ``models`` (already loaded or built)."""
    backend = make_backend(cfg.backend, models, cfg.engines, cuda_graph=cfg.cuda_graph, inject=cfg.inject)
    grad = backend if backend.supports_grad else (TorchBackend(models, cfg.inject) if cfg.latent_update == "autograd"
                                                  else None)
    for b in {id(x): x for x in (backend, grad) if isinstance(x, TorchBackend)}.values():
        b.optimize(compile=cfg.compile, channels_last=cfg.channels_last)
    return Runtime(models, backend, grad)


def runtime_matching(rt: Runtime, cfg: EditConfig) -> Runtime:
    """``rt`` if its backends inject where ``cfg`` asks (``--inject``), else new backends over the same
    loaded models (an ablation that shares one runtime across decoder-only and all-layer edits)."""
    if all(getattr(b, "inject", "decoder") == cfg.inject for b in (rt.backend, rt.grad_backend) if b is not None):
        return rt
    return runtime_for(cfg, rt.models)


def invert_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``--invert-dtype`` as (dtype, TF32): "same" -> (None, False), "tf32" -> (fp32, True) on
    CUDA (an error elsewhere: TF32 is a tensor-core mode), else the dtype it names."""
    if name == "same":
        return None, False
    if name == "tf32":
        if torch.device(device).type != "cuda":
            raise InputError("--invert-dtype tf32 is TF32 tensor-core math on a CUDA GPU; on the CPU use fp32")
        return torch.float32, True
    return resolve_dtype(name, device), False


def inversion_runtime(models, backend: Backend, grad_backend: Backend | None, dtype: torch.dtype | None,
                      tf32: bool = False) -> InversionRuntime:
    """Where the inversion runs: the edit's backend if it computes in ``dtype`` (None: whatever it
    computes in), else its PyTorch gradient backend if that does, else a PyTorch backend in
    ``dtype`` made on a cache miss: on ``models`` themselves when they are in ``dtype``, else on
    a copy of their UNet, VAE and text encoder cast to ``dtype`` (fp16 weights upcast exactly:
    the inversion then inverts the very weights the edit samples with, in fp32 arithmetic). The
    identity of such a copy also names the precision its weights were loaded in: fp16-rounded
    weights are other weights, so their inversion is not the fp32 model's. ``tf32``: a PyTorch
    backend in fp32 of its own whose calls use TF32 math (its identity says so: another cache
    entry than fp32's)."""
    if tf32:
        assert dtype == torch.float32
        base = models if models.dtype == dtype else None
        identity = {**runtime_identity("torch", dtype, models.device), "math": "tf32"}
        if base is None:
            identity["weights"] = str(models.dtype).removeprefix("torch.")

        def make_tf32() -> Backend:
            b = TorchBackend(base if base is not None else models_in_dtype(models, dtype))
            b.tf32 = True
            return b

        return InversionRuntime(identity, make_tf32)
    for b in (backend, grad_backend):
        if b is not None and (dtype is None or b.dtype == dtype):
            return InversionRuntime.of(b)
    assert dtype is not None
    if models.dtype == dtype:  # no PyTorch backend yet (a graph backend without autograd steps)
        return InversionRuntime(runtime_identity("torch", dtype, models.device), lambda: TorchBackend(models))
    identity = {**runtime_identity("torch", dtype, models.device), "weights": str(models.dtype).removeprefix("torch.")}
    return InversionRuntime(identity, lambda: TorchBackend(models_in_dtype(models, dtype)))


def models_in_dtype(models, dtype: torch.dtype):
    """A copy of ``models`` with the UNet, VAE and text encoder cast to ``dtype`` (the depth
    estimator, fp32 always, and the rest shared)."""
    import copy
    import dataclasses

    from p2v_fast.weights.hub import quiet_loading

    with quiet_loading():  # diffusers advises against casting with .to(); here the cast is the point
        cast = {name: copy.deepcopy(getattr(models, name)).to(dtype) for name in ("unet", "vae", "text_encoder")}
    return dataclasses.replace(models, dtype=dtype, **cast)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """PyTorch's CPU intra-op threads set to ``n`` while the block runs (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class InversionRuntime:
    """The backend an inversion runs on, described before it exists: a backend in another
    dtype (a copy of the weights) is made only on a cache miss."""

    identity: dict[str, str]  # Backend.identity() of the backend make() returns (+ "weights" if cast)
    make: Callable[[], Backend]

    @classmethod
    def of(cls, backend: Backend) -> InversionRuntime:
        return cls(backend.identity(), lambda: backend)

    def describe(self) -> str:
        return describe_runtime(self.identity)


def describe_runtime(identity: dict[str, str]) -> str:
    """A :meth:`Backend.identity` in words: "torch float32 on cpu", "onnxruntime float16 on cpu, graphs ..."."""
    extra = "".join(f", {k} {v}" for k, v in identity.items() if k not in ("backend", "dtype", "device"))
    return f"{identity.get('backend')} {identity.get('dtype')} on {identity.get('device')}{extra}"


def make_backend(name: str, models, engines=None, cuda_graph: bool = False, inject: str = "decoder") -> Backend:
    """The backend called ``name`` for ``models``.

    ``engines``: the folder ``p2v export`` wrote (default ``./engines``) for ``onnxruntime`` and
    ``tensorrt``. ``auto``: tensorrt if TensorRT is usable and the folder holds engines built on
    this machine for this model, else onnxruntime if it holds this model's ONNX graphs, else torch.
    ``cuda_graph``: the tensorrt backend replays its (static-shape) engines as CUDA graphs.
    """
    if name == "auto":
        from p2v_fast.nets.runtime import choose_auto

        name = choose_auto(models, engines)
    if cuda_graph and name != "tensorrt":
        from p2v_fast.errors import InputError

        raise InputError(f"--cuda-graph needs the tensorrt backend; {name} runs here (PyTorch: --compile)")
    if inject != "decoder" and name != "torch":
        from p2v_fast.errors import InputError

        raise InputError(f"--inject {inject} runs on --backend torch: the {name} engines hold the decoder's 9 layers")
    if name == "torch":
        return TorchBackend(models, inject)
    if name == "onnxruntime":
        from p2v_fast.nets.backend_onnx import OnnxRuntimeBackend

        return OnnxRuntimeBackend(models, engines)
    if name == "tensorrt":
        from p2v_fast.nets.backend_tensorrt import TensorRTBackend

        return TensorRTBackend(models, engines, cuda_graph=cuda_graph)
    from p2v_fast.errors import BackendUnavailableError

    raise BackendUnavailableError(f"backend {name!r} is unknown; use torch, onnxruntime, tensorrt or auto")


def choose_auto(models, engines: str | Path | None) -> str:
    """``auto``: tensorrt if TensorRT is usable and the folder holds engines that match this
    machine and model; else onnxruntime if it holds ONNX graphs of this model; else torch."""
    from p2v_fast.nets.graph_backend import engines_folder, load_checked_manifest
    from p2v_fast.nets.manifest import check_machine, this_machine
    from p2v_fast.nets.system import onnxruntime_status, tensorrt_status

    folder = engines_folder(engines)
    try:
        manifest = load_checked_manifest(models, folder)
    except EngineError:
        return "torch"
    if tensorrt_status()[0] and manifest.has_engines:
        try:
            check_machine(manifest, this_machine(models.device), folder)
            return "tensorrt"
        except EngineError:
            pass
    if onnxruntime_status()[0] and all(e.onnx is not None for e in manifest.networks.values()):
        return "onnxruntime"
    return "torch"
