"""Device choice: CUDA when available, else CPU; a readable name for the UI."""
from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but no GPU is visible to PyTorch; use --device cpu")
    return torch.device(device)


def device_name(device: torch.device | str = "auto") -> str:
    """'NVIDIA H100 ...' for a GPU, 'CPU (N threads)' otherwise."""
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
