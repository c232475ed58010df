"""A model (pruned or not) as ONNX for the runtime it ships on, checked against PyTorch's output before it is
offered.

The TorchScript-based exporter (`torch.onnx.export(dynamo=False)`) is used: it exports the zoo, torchvision and
timm nets this project prunes with a dynamic batch dimension. onnx and onnxruntime are imported on first use only.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import SospError
from ..atomic import write_bytes_atomically

OPSET = 17
TOLERANCE = 1e-4  # relative max deviation of ONNX Runtime's float32 output from PyTorch's


class ExportError(SospError):
    """The model cannot be exported to ONNX, or the export does not compute what the model computes."""


def onnx_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """The model in eval mode as ONNX (input `input`, output `logits`, the batch dimension dynamic), on the CPU."""
    model = copy.deepcopy(model).cpu().float().eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on its own deprecation and on tracing
            torch.onnx.export(
                model,
                (example_input[:1].cpu().float(),),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as exc:  # the exporter raises many types for unsupported operators
        raise ExportError(
            f"torch.onnx cannot export this model ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]})"
        ) from None
    return buffer.getvalue()


def onnx_deviation(exported: bytes, model: nn.Module, x: torch.Tensor) -> float:
    """max |ONNX Runtime(x) - model(x)| / max |model(x)| on real inputs (CPU execution provider)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
    inputs = x.cpu().float()
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
    with torch.no_grad():
        expected = copy.deepcopy(model).cpu().float().eval()(inputs)
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


CHECK_SAMPLES = 32  # real samples an export is compared with PyTorch on


def varied_inputs(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs unlike the samples an export is usually checked on, so a branch on tensor values that the trace froze
    shows: the samples negated, noise at their scale, shifted up and down by three of their deviations, ten times
    larger."""
    x = x.cpu().float()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen) * x.std().clamp(min=1e-3)
    shift = 3 * x.std().clamp(min=1e-3)
    return {
        "real": x,
        "negated": -x,
        "noise": noise + x.mean(),
        "shifted up": noise + shift,
        "shifted down": noise - shift,
        "ten times larger": 10 * x,
    }


def checked_onnx(model: nn.Module, example_input: torch.Tensor, x: torch.Tensor) -> tuple[bytes, float]:
    """The ONNX export and its largest measured deviation from PyTorch, on `x` and on varied inputs (`varied_inputs`);
    refused when any is beyond TOLERANCE."""
    exported = onnx_bytes(model, example_input)
    deviations = {kind: onnx_deviation(exported, model, inputs) for kind, inputs in varied_inputs(x).items()}
    kind, deviation = max(deviations.items(), key=lambda item: item[1])
    if not deviation <= TOLERANCE:
        if kind == "real":
            raise ExportError(
                f"the ONNX export deviates from PyTorch by {deviation:.1e} of the output on {len(x)} "
                f"samples (tolerance {TOLERANCE:.0e}); it was not written"
            )
        raise ExportError(
            f"the ONNX export matches PyTorch on the {len(x)} real samples but deviates by {deviation:.1e} of the "
            f"output on {kind} inputs (tolerance {TOLERANCE:.0e}): the model's forward most likely branches on "
            "tensor values, which an export freezes at the example's branch; it was not written"
        )
    return exported, deviation


def save_onnx(path: str | Path, model: nn.Module, example_input: torch.Tensor, x: torch.Tensor) -> float:
    """Write the checked export to `path` (whole or not at all); returns its measured deviation."""
    exported, deviation = checked_onnx(model, example_input, x)
    write_bytes_atomically(path, exported)
    return deviation
