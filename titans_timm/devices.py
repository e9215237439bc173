"""Which torch device can run here: the one check the trainer and the evaluator make before any work."""
from typing import Optional

import torch

__all__ = ['device_problem']


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
