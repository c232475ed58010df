"""What a design review asks of an analysis first, measured: test accuracy before and right after pruning at a mask,
and where the weights came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..atomic import file_digest
from ..pruning.workbench import Workbench
from .training import evaluate

DEMO_FOLDER = Path(__file__).resolve().parents[2] / "assets" / "demo"


@dataclass(frozen=True)
class MaskAccuracy:
    """Test accuracy of the net as analysed and of the net pruned physically at a mask (no fine-tuning)."""

    before: float
    after_pruning: float
    samples: int


def mask_accuracy(workbench: Workbench, mask: set[str], batch: int = 512) -> MaskAccuracy:
    """Top-1 accuracy on the test split of the workbench's net and of that net pruned at `mask`."""
    loader = workbench.data.loader("test", batch)
    _, before = evaluate(workbench.model, loader, "cpu", amp=False)
    _, after = evaluate(workbench.prune(mask).model, loader, "cpu", amp=False)
    return MaskAccuracy(before, after, len(loader.dataset))


def weights_origin(weights: str | None, workspace: Path | None = None) -> str:
    """Where a checkpoint came from, in words a reviewer can check: the shipped demo, an upload, a job of the
    workspace, or a file with the start of its SHA-256 (random init where there is none)."""
    if not weights:
        return "random initialisation (no checkpoint)"
    path = Path(weights).resolve()
    try:
        digest = f"SHA-256 {file_digest(path)[:16]}"
    except OSError:
        digest = "the file is no longer there"
    if path.is_relative_to(DEMO_FOLDER):
        return f"the shipped demo checkpoint {path.name} (made as assets/demo/README.md says; {digest})"
    if workspace is not None and path.is_relative_to(workspace / "uploads"):
        return f"the uploaded file {path.name} ({digest})"
    if workspace is not None and path.is_relative_to(workspace / "artifacts" / "jobs"):
        job = path.relative_to(workspace / "artifacts" / "jobs").parts[0]
        return f"trained in this workspace by job {job} ({path.name}; {digest})"
    return f"the checkpoint {path.name} ({digest})"
