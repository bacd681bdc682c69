"""Devices and numeric precision for training and audits.

``auto`` picks CUDA, then Apple's MPS, then the CPU. Forward passes may run under autocast in
bf16 or fp16; every metric memlens accumulates (alignment losses, unit means, sums of
per-example gradients) is computed in float32 or float64 regardless.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from memlens.errors import MemlensError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names, checked to exist here.

    Raises:
        MemlensError: the device is not available on this machine, or the name is unknown.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise MemlensError("device 'mps' was asked for, but this machine has no usable Apple MPS backend")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MemlensError(f"device '{spec}' was asked for, but CUDA is not available on this machine "
                               f"(use --device cpu or auto)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MemlensError(f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s)")
        return dev
    raise MemlensError(f"unknown device '{spec}'; valid: auto, cpu, cuda, cuda:N, mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """Autocast forward passes to ``precision`` (no-op for fp32).

    Raises:
        MemlensError: an unknown precision, or fp16 asked for on a device without it.
    """
    if precision not in PRECISIONS:
        raise MemlensError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def pin(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU batch to ``device``: pinned and non-blocking when the device is CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
