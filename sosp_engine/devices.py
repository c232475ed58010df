"""Device choice: CUDA when available, else CPU; a readable name for the UI."""

from __future__ import annotations

import sys

import socket

import threading
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import SospError


class DeviceError(SospError):
    """A device that does not exist here, or not enough memory on it."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU; 'cpu', 'cuda' or 'cuda:N' as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(f"device '{device}' is not supported; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was asked for but no GPU is visible to PyTorch; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"there is no {device}: {torch.cuda.device_count()} GPU(s) visible")
    return resolved


class SharedSetting:
    """A process-wide torch setting, changed while anyone is inside and given back when the last one leaves.

    Torch's backend switches are global, so overlapping users (the app's analysis and training threads) share one
    change; the first in saves what the user had set and the last out restores it.
    """

    def __init__(
        self, read: Callable[[], object], change: Callable[[], None], restore: Callable[[object], None]
    ) -> None:
        self._read, self._change, self._restore = read, change, restore
        self._lock = threading.Lock()
        self._users = 0
        self._saved: object = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = self._read()
                self._change()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._restore(self._saved)


def _tf32_setting() -> tuple:
    """What to restore: torch's two TF32 switches, or the per-operator flags where a user set those (torch's legacy
    getters raise when cuDNN's convolution and RNN flags were set apart)."""
    try:
        return ("switches", torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        flags = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
        return ("per-operator", [(flag, flag.fp32_precision) for flag in flags])


def _tf32_off() -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _restore_tf32(setting: tuple) -> None:
    if setting[0] == "switches":
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = setting[1:]
    else:
        for flag, value in setting[1]:
            flag.fp32_precision = value


_FULL_FLOAT32 = SharedSetting(_tf32_setting, _tf32_off, _restore_tf32)


def full_float32() -> AbstractContextManager[None]:
    """CUDA convolutions and matrix products in IEEE float32 while inside, not TF32 (cuDNN's default for convolutions).

    TF32 keeps 10 mantissa bits: saliencies would move by about 1e-3 and the exact-scaling checks would fail.
    Usable as `with full_float32():` and as a decorator `@full_float32()`.
    """
    return _FULL_FLOAT32.held()


def _cudnn_choice() -> tuple[bool, bool]:
    return torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark


def _deterministic_cudnn() -> None:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def _restore_cudnn(choice: tuple[bool, bool]) -> None:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = choice


_DETERMINISTIC = SharedSetting(_cudnn_choice, _deterministic_cudnn, _restore_cudnn)


def deterministic_kernels() -> AbstractContextManager[None]:
    """cuDNN's deterministic algorithms while inside (no autotuning): the same run gives the same weights on a GPU,
    so a resumed training equals an uninterrupted one there too (some of cuDNN's default backward algorithms add
    in a varying order). No effect on a CPU, whose kernels are deterministic for a fixed thread count."""
    return _DETERMINISTIC.held()


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device` (GPU: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def device_name(device: torch.device | str = "auto") -> str:
    """'NVIDIA H100 ...' for a GPU, 'CPU' otherwise (the thread count is shown beside it, it can change)."""
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def set_threads(threads: int | None = None) -> int:
    """CPU threads for torch: `threads`, else $SOSP_THREADS, else torch's default; returns the count in use.

    On a busy machine fewer threads than cores can be several times faster (less contention).
    """
    import os

    value = threads if threads is not None else os.environ.get("SOSP_THREADS")
    if value is not None and str(value).strip():
        try:
            count = int(value)
        except ValueError:
            raise DeviceError(f"the thread count must be a whole number, got '{value}'") from None
        if count < 1:
            raise DeviceError(f"the thread count must be at least 1, got {count}")
        torch.set_num_threads(count)
    return torch.get_num_threads()


def node_name() -> str:
    """This machine as the Runs and Studies pages name it: its hostname, with the node's IP inside a Ray worker (two
    nodes may share a hostname)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    return socket.gethostname()
