"""A mask made physical, as the CLI's `prune` and the Ratios page both offer it: the pruned model with the recipe that
reopens it, the measured exactness of the removal, and a checked ONNX export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..nets.onnx_export import CHECK_SAMPLES, ExportError, checked_onnx
from .counting import count_macs, count_params
from .exactness import EXACTNESS_SAMPLES, exactness_report
from .masks import mask_summary
from .pruned_models import pruned_checkpoint_bytes, save_pruned
from .workbench import PrunedModel, Workbench


@dataclass
class PrunedExport:
    """The pruned model of a mask and what was measured on it; `onnx` is None where the export was refused (`onnx_line`
    says why) or not asked for."""

    pruned: PrunedModel
    summary: dict
    exactness: dict
    onnx: bytes | None = None
    onnx_deviation: float | None = None  # ONNX Runtime's output against PyTorch's, relative
    onnx_line: str = ""

    def checkpoint_bytes(self) -> bytes:
        """The pruned checkpoint (weights and recipe) as a download."""
        return pruned_checkpoint_bytes(self.pruned.model, self.pruned.recipe)

    def save(self, path: str | Path) -> Path:
        """Write the pruned checkpoint (reopens with `--model SPEC --weights PATH`)."""
        return save_pruned(path, self.pruned.model.cpu(), self.pruned.recipe)

    def counted(self, workbench: Workbench) -> dict:
        """Parameters and MACs counted on the pruned model itself (they equal the summary's predictions)."""
        return {
            "params_counted": count_params(self.pruned.model),
            "macs_counted": count_macs(self.pruned.model, workbench.example),
        }


def export_pruned(workbench: Workbench, mask: set[str], onnx: bool = True, seed: int = 0) -> PrunedExport:
    """Prune the workbench's net by `mask`, measure that removal equals zeroing there, and export it to ONNX checked
    against PyTorch on real samples (drawn with `seed`)."""
    pruned = workbench.prune(mask)
    x, _ = workbench.data.analysis_samples(max(EXACTNESS_SAMPLES, CHECK_SAMPLES), seed)
    exactness = exactness_report(workbench.model, workbench.structures, mask, workbench.example, x)
    export = PrunedExport(pruned, mask_summary(workbench.structures, mask), exactness)
    if onnx:
        samples = x[:CHECK_SAMPLES]
        try:
            export.onnx, export.onnx_deviation = checked_onnx(pruned.model, workbench.example, samples)
            export.onnx_line = (
                f"ONNX Runtime's output deviates from PyTorch's by {export.onnx_deviation:.1e} on "
                f"{len(samples)} real samples and on varied inputs (negated, noise, shifted, scaled)"
            )
        except ExportError as exc:  # the checkpoint is still offered
            export.onnx_line = f"No ONNX export: {exc}"
    return export
