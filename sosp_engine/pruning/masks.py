"""Masks (sets of structure keys): per-layer tables, zeroing, physical pruning, comparison, JSON files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch
from torch import nn

from ..atomic import NotAFileError, read_regular
from ..errors import MaskError, SospError
from .removal import remove_structures
from .structures import TRANSPOSED_TYPES, StructureSet, architecture_signature, output_axis

MASK_FORMAT = "sosp-mask/1"
MASK_FILE_LIMIT = 16 << 20  # bytes; about 35 bytes a structure, so ~480k structures


def layer_table(structures: StructureSet, mask: Iterable[str] = ()) -> pd.DataFrame:
    """One row per prunable layer: channels total / kept / pruned, ratio, params and MACs before / after,
    depth, stage, block."""
    pruned = structures.pruned_vector(set(mask))
    params0, macs0 = structures.module_costs()
    params1, macs1 = structures.module_costs(pruned)
    owner = torch.tensor([m.layer for m in structures.modules])
    n = len(structures.layers)
    pruned_per_layer = torch.zeros(n, dtype=torch.long).index_add_(0, structures.layer_of, pruned.long())

    def per_layer(values: torch.Tensor) -> list[int]:
        return [int(round(values[owner == g].sum().item())) for g in range(n)]

    unit = torch.tensor([l.structure_size for l in structures.layers])
    pruned_channels = pruned_per_layer * unit
    rows = {
        "layer": [l.name for l in structures.layers],
        "depth": [l.depth for l in structures.layers],
        "stage": [l.stage for l in structures.layers],
        "block": [l.block for l in structures.layers],
        "kernel": [round(l.kernel, 3) for l in structures.layers],
        "channels": [l.channels for l in structures.layers],
        "structure_size": unit.tolist(),
        "kept": [l.channels - int(p) for l, p in zip(structures.layers, pruned_channels)],
        "pruned": pruned_channels.tolist(),
        "params_before": per_layer(params0),
        "params_after": per_layer(params1),
        "macs_before": per_layer(macs0),
        "macs_after": per_layer(macs1),
    }
    table = pd.DataFrame(rows)
    table["pruning_ratio"] = table["pruned"] / table["channels"]
    return table


def channel_table(structures: StructureSet) -> pd.DataFrame:
    """One row per conv / linear: its width as offered, unprunable and excluded channels, and why (the Model page)."""
    columns = ["module", "width", "offered", "unprunable", "excluded", "why"]
    return pd.DataFrame(structures.channel_account(), columns=columns).fillna({"why": ""})


def mask_summary(structures: StructureSet, mask: Iterable[str] = ()) -> dict[str, float]:
    """Whole-model counts before and after applying a mask, and the pruned fractions."""
    pruned = structures.pruned_vector(set(mask))
    p0, m0 = structures.counts()
    p1, m1 = structures.counts(pruned)
    return {
        "structures": structures.num_structures,
        "structures_pruned": int(pruned.sum()),
        "params_before": p0,
        "params_after": p1,
        "macs_before": m0,
        "macs_after": m1,
        "structure_ratio": float(pruned.float().mean()),
        "param_ratio": 1 - p1 / p0 if p0 else 0.0,
        "mac_ratio": 1 - m1 / m0 if m0 else 0.0,
    }


def zeroed_copy(model: nn.Module, structures: StructureSet, mask: Iterable[str]) -> nn.Module:
    """A copy of `model` with every in-weight of the masked structures set to zero (the original is untouched)."""
    pruned = structures.pruned_vector(set(mask))
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for piece in structures.producers:
            hit = pruned[piece.structure]
            if not bool(hit.any()):
                continue
            module = zeroed.get_submodule(piece.module)
            for pname in ("weight", "bias"):
                param = getattr(module, pname, None)
                if isinstance(param, torch.Tensor):
                    param.movedim(output_axis(module, pname), 0)[piece.channels[hit]] = 0
    return zeroed


def prune_in_place(
    model: nn.Module, structures: StructureSet, mask: Iterable[str], example_input: torch.Tensor
) -> None:
    """Physically remove the masked structures from `model` (the engine's own surgery, removal.py)."""
    pruned = structures.pruned_vector(set(mask))
    if structures.signature != architecture_signature(model):
        raise MaskError("the structures were found on another architecture than this model")
    emptied = structures.emptied_producers(pruned)
    if emptied:
        raise MaskError(
            f"the mask removes every output channel of {emptied[:3]}; keep at least one channel per layer"
        )
    remove_structures(model, structures, pruned)
    _check_widths(model, structures, pruned)


def _widths(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.weight.shape[1], module.weight.shape[0]
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.weight.shape[1] * module.groups, module.weight.shape[0]
    if isinstance(module, TRANSPOSED_TYPES):
        return module.weight.shape[0], module.weight.shape[1] * module.groups
    weight = getattr(module, "weight", None)
    return (
        (weight.shape[0], weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 1 else None
    )


def _check_widths(model: nn.Module, structures: StructureSet, pruned: torch.Tensor) -> None:
    """Every conv, linear and norm has the widths the structures predict, else the pruned model would be wrong."""
    removed = (pruned.to(torch.float64) @ structures.removal).round().long().tolist()
    for i, info in enumerate(structures.modules):
        if info.kind not in ("conv", "depthwise", "linear", "norm"):
            continue
        actual = _widths(model.get_submodule(info.name))
        expected_out = info.out_channels - removed[2 * i + 1]
        expected_in = expected_out if info.kind == "norm" else info.in_channels - removed[2 * i]
        if actual is not None and actual != (expected_in, expected_out):
            raise MaskError(
                f"the surgery left {info.name} at {actual[0]} -> {actual[1]} channels, but the structures "
                f"predict {expected_in} -> {expected_out}: this architecture couples channels in a way the "
                "engine does not follow there; exclude that layer (--exclude) or its block"
            )


def pruned_copy(
    model: nn.Module, structures: StructureSet, mask: Iterable[str], example_input: torch.Tensor
) -> nn.Module:
    """A new, physically smaller model without the masked structures (the original is untouched)."""
    smaller = copy.deepcopy(model)
    prune_in_place(smaller, structures, mask, example_input)
    return smaller


def compare_masks(
    structures: StructureSet, mask_a: Iterable[str], mask_b: Iterable[str]
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-layer Jaccard overlap and ratio difference of two masks of one architecture, and the overall overlap."""
    a, b = structures.pruned_vector(set(mask_a)), structures.pruned_vector(set(mask_b))
    n = len(structures.layers)
    inter = torch.zeros(n, dtype=torch.float64).index_add_(0, structures.layer_of, (a & b).double())
    union = torch.zeros(n, dtype=torch.float64).index_add_(0, structures.layer_of, (a | b).double())
    sizes = structures.layer_sizes().double()
    ratio_a = torch.zeros(n, dtype=torch.float64).index_add_(0, structures.layer_of, a.double()) / sizes
    ratio_b = torch.zeros(n, dtype=torch.float64).index_add_(0, structures.layer_of, b.double()) / sizes
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones(n, dtype=torch.float64))
    table = pd.DataFrame(
        {
            "layer": [l.name for l in structures.layers],
            "depth": [l.depth for l in structures.layers],
            "stage": [l.stage for l in structures.layers],
            "ratio_a": ratio_a.tolist(),
            "ratio_b": ratio_b.tolist(),
            "ratio_difference": (ratio_b - ratio_a).tolist(),
            "jaccard": jaccard.tolist(),
        }
    )
    total_union = int((a | b).sum())
    overall = {
        "jaccard": float((a & b).sum()) / total_union if total_union else 1.0,
        "pruned_a": int(a.sum()),
        "pruned_b": int(b.sum()),
        "shared": int((a & b).sum()),
    }
    params, macs = structures.counts()
    for name, pruned in (("a", a), ("b", b)):  # the fair units across methods: what each mask really removes
        params_after, macs_after = structures.counts(pruned)
        overall[f"param_ratio_{name}"] = 1 - params_after / params
        overall[f"mac_ratio_{name}"] = 1 - macs_after / macs
    return table, overall


def mask_json(structures: StructureSet, mask: Iterable[str], **meta: object) -> str:
    """A mask as JSON text keyed by structure keys, with the architecture signature it belongs to."""
    keys = sorted(set(mask), key=structures.key_index().__getitem__)
    structures.pruned_vector(keys)
    return json.dumps(
        {"format": MASK_FORMAT, "architecture": structures.signature, "meta": meta, "pruned": keys}, indent=1
    )


def save_mask(path: str | Path, structures: StructureSet, mask: Iterable[str], **meta: object) -> Path:
    """Write a mask JSON file (written to a temporary name, then renamed)."""
    text = mask_json(structures, mask, **meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _mask_text(path: Path) -> str:
    """A mask file's text, refused unread when it is no regular file or larger than any mask (a JSON parser takes
    ~15x its size)."""
    try:
        return read_regular(path, MASK_FILE_LIMIT).decode()
    except NotAFileError as exc:
        raise MaskError(f"mask file {exc}: give the mask.json of an analysis") from None
    except SospError as exc:
        raise MaskError(f"mask file {exc} (a mask of even the largest model is smaller)") from None


def mask_meta(path: str | Path) -> dict:
    """The metadata (method, ratio, unit, ...) stored with a mask file; {} when there is none or it is unreadable."""
    try:
        payload = json.loads(_mask_text(Path(path)))
    except (OSError, ValueError, RecursionError, MaskError):
        return {}
    meta = payload.get("meta") if isinstance(payload, dict) else None
    return meta if isinstance(meta, dict) else {}


def load_mask(path: str | Path, structures: StructureSet | None = None) -> set[str]:
    """Read a mask JSON; with `structures`, check that it belongs to that architecture."""
    path = Path(path)
    try:
        payload = json.loads(_mask_text(path))
    except FileNotFoundError:
        raise MaskError(f"mask file '{path}' does not exist") from None
    except IsADirectoryError:
        raise MaskError(f"mask file '{path}' is a folder: give the mask.json inside it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MaskError(f"mask file '{path}' is not valid JSON: {exc}") from None
    except RecursionError:
        raise MaskError(f"mask file '{path}' nests deeper than any mask: not a mask file") from None
    except OSError as exc:
        raise MaskError(f"mask file '{path}' cannot be read: {exc.strerror}") from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != MASK_FORMAT
        or not isinstance(payload.get("pruned"), list)
    ):
        raise MaskError(f"'{path}' is not a SOSP Lab mask file (expected format '{MASK_FORMAT}')")
    if not all(isinstance(k, str) for k in payload["pruned"]):
        raise MaskError(
            f"'{path}' has mask entries that are not structure keys (strings like 'layer1.0.conv1:3')"
        )
    mask = set(payload["pruned"])
    if structures is not None:
        if payload.get("architecture") != structures.signature:
            raise MaskError(
                f"mask '{path}' was made for another architecture (signature {payload.get('architecture')}, "
                f"this model has {structures.signature}); masks transfer only between weights of one architecture"
            )
        structures.pruned_vector(mask)
    return mask


def ratio_profiles(structures: StructureSet, masks: dict[str, Iterable[str]]) -> pd.DataFrame:
    """Layer-wise pruning ratios of several masks of one architecture: one column per mask name (paper Fig. 3)."""
    base = layer_table(structures)[["layer", "depth", "stage", "channels"]]
    for name, mask in masks.items():
        base[name] = layer_table(structures, mask)["pruning_ratio"].values
    return base
