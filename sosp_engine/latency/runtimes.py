"""The runtimes a net's latency is timed in: PyTorch eager, or ONNX Runtime (the runtime many pruned models ship on).

Latency follows the runtime's kernels and graph optimisations (ONNX Runtime folds BatchNorm into the conv before it,
fuses activations and picks its own convolution kernels), so a mask's latency drop is measured where it is deployed.
onnxruntime is imported on first use only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import AnalysisError

EAGER = "eager"
ONNXRUNTIME = "onnxruntime"
RUNTIMES = (EAGER, ONNXRUNTIME)
# ONNX Runtime's providers for a GPU, preferred first; the CPU provider runs what they do not take
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

Forward = Callable[[], object]  # one inference of a prepared net on its prepared input


def check_runtime(runtime: str) -> str:
    """`runtime` if it is one this engine times in, else a clear error."""
    if runtime not in RUNTIMES:
        raise AnalysisError(f"unknown latency runtime '{runtime}'; use one of {', '.join(RUNTIMES)}")
    return runtime


def onnxruntime_providers(device: torch.device) -> list[str]:
    """The execution providers for `device`: the CPU one on the CPU; TensorRT and CUDA (where installed) on a GPU."""
    import onnxruntime

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    found = [p for p in GPU_PROVIDERS if p in onnxruntime.get_available_providers()]
    if not found:
        raise AnalysisError(
            "this onnxruntime has no GPU execution provider (it offers "
            f"{', '.join(onnxruntime.get_available_providers())}): install onnxruntime-gpu to time on "
            f"{device}, or time on the CPU"
        )
    return found + ["CPUExecutionProvider"]


def _onnxruntime_forward(net: nn.Module, x: torch.Tensor, device: torch.device) -> Forward:
    """Export `net`, open a session with as many intra-op threads as torch uses, and bind `x` where it runs."""
    import onnxruntime

    from ..nets.onnx_export import onnx_bytes

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        onnx_bytes(net, x), options, providers=onnxruntime_providers(device)
    )
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
    host = x.detach().cpu().float().contiguous().numpy()
    if device.type == "cpu":
        feed = {name: host}
        return lambda: session.run([output], feed)
    # on a GPU the input and output stay in device memory, as eager's do; the call returns once the output is there
    binding = session.io_binding()
    index = device.index or 0
    binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(host, "cuda", index))
    binding.bind_output(output, "cuda", index)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def forward_call(net: nn.Module, x: torch.Tensor, runtime: str, device: torch.device) -> Forward:
    """One inference of `net` on `x` in `runtime` on `device`, ready to time: whatever does not recur per inference
    (export, session, placing the input) is done here, once. Eager puts `net` in eval mode on `device` in place."""
    check_runtime(runtime)
    if runtime == ONNXRUNTIME:
        return _onnxruntime_forward(net, x, device)
    net.eval().to(device)
    x = x.to(device)

    def run() -> object:
        with torch.no_grad():
            return net(x)

    return run


def runtime_label(runtime: str, device: torch.device | str) -> str:
    """The runtime and device in words, for tables and captions."""
    device = torch.device(device)
    if runtime == ONNXRUNTIME:
        return f"ONNX Runtime on {device}"
    return f"PyTorch eager on {device}"
