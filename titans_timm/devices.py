"""What this machine offers the CLIs: the default torch device, the check of a requested one, and the CPU cores."""
import os
from typing import Optional

import torch

__all__ = ['default_device', 'device_problem', 'cpu_cores']


def default_device() -> str:
    """``cuda`` when a CUDA device is available, else ``cpu`` (the CLIs' default ``--device``)."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as ``taskset`` or a container sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def device_problem(name: str) -> Optional[str]:
    """Why ``--device name`` cannot run here (not a torch device, none of its kind, an index out of range), or
    None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f'--device {name!r} is not a torch device; use cpu, cuda or cuda:N'
    if device.type == 'cpu':
        return None
    backend = torch.backends.mps if device.type == 'mps' else getattr(torch, device.type, None)
    is_available = getattr(backend, 'is_available', None)
    if is_available is None or not is_available():
        return f'--device {name}: no {device.type} device is available here; pass --device cpu'
    count = getattr(backend, 'device_count', None)
    if device.index is not None and count is not None and device.index >= count():
        return f'--device {name}: only {count()} {device.type} device(s) here; use {device.type}:0 to {device.type}:{count() - 1}'
    return None
