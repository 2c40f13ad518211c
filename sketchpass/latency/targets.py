"""The runtimes a latency budget can be measured on.

=================  ==========  ===========================================================
target             models      runs on
=================  ==========  ===========================================================
``torch-cpu``      PyTorch     the model itself, on the CPU (default for PyTorch models)
``torch-cuda``     PyTorch     the model moved to the first CUDA device
``ort-cpu``        ONNX        ONNX Runtime's ``CPUExecutionProvider`` (default for ONNX models)
``ort-cuda``       ONNX        ``CUDAExecutionProvider``, where ONNX Runtime has it
``ort-tensorrt``   ONNX        ``TensorrtExecutionProvider``, where ONNX Runtime has it
=================  ==========  ===========================================================

A :class:`Target` records what a timing depends on — runtime and version, device, threads — and is part
of every timing-table key and of the plan.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

TARGETS = {"torch-cpu": "torch", "torch-cuda": "torch", "ort-cpu": "onnx", "ort-cuda": "onnx", "ort-tensorrt": "onnx"}
PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-tensorrt": "TensorrtExecutionProvider"}
DEFAULTS = {"torch": "torch-cpu", "onnx": "ort-cpu"}


@dataclass(frozen=True)
class Target:
    name: str
    frontend: str
    runtime: str  # "torch 2.14.1" / "onnxruntime 1.32.0"
    device: str  # CPU model or GPU name
    threads: int

    @property
    def cuda(self) -> bool:
        return self.name in ("torch-cuda", "ort-cuda", "ort-tensorrt")

    @property
    def provider(self) -> str | None:
        return PROVIDERS.get(self.name)

    def key(self) -> str:
        return f"{self.name}|{self.runtime}|{self.device}|{self.threads}"

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_targets() -> list[str]:
    """The targets that can run on this machine (the runtime and, for GPUs, the device are present)."""
    out = []
    try:
        import torch

        out.append("torch-cpu")
        if torch.cuda.is_available():
            out.append("torch-cuda")
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        import onnxruntime as ort

        have = set(ort.get_available_providers())
        out += [t for t, p in PROVIDERS.items() if p in have]
    except ImportError:
        pass
    return out


def resolve_target(name: str | None, frontend: str, threads: int | None = None) -> Target:
    """The :class:`Target` called ``name`` (``None``: the frontend's default) for a model of ``frontend``;
    errors name what is available here."""
    name = name or DEFAULTS[frontend]
    here = available_targets()
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; the targets are {', '.join(TARGETS)} (available here: "
                         f"{', '.join(here) or 'none'})")
    if TARGETS[name] != frontend:
        kind = "PyTorch" if frontend == "torch" else "ONNX"
        fitting = [t for t in here if TARGETS[t] == frontend]
        raise ValueError(f"target {name!r} runs {'ONNX' if TARGETS[name] == 'onnx' else 'PyTorch'} models; this is a "
                         f"{kind} model (targets for it here: {', '.join(fitting) or 'none'}; export the model to "
                         f"time it in ONNX Runtime)")
    if name not in here:
        raise ValueError(f"target {name!r} is not available on this machine (its runtime or device is missing); "
                         f"available here: {', '.join(here) or 'none'}")
    if frontend == "torch":
        import torch

        threads = int(threads or torch.get_num_threads())
        device = torch.cuda.get_device_name(0) if name == "torch-cuda" else _cpu_name()
        return Target(name, frontend, f"torch {torch.__version__}", device, threads)
    import onnxruntime as ort

    threads = int(threads or os.cpu_count() or 1)
    device = _cpu_name() if name == "ort-cpu" else f"{ort.get_device()} ({PROVIDERS[name]})"
    return Target(name, frontend, f"onnxruntime {ort.__version__}", device, threads)
