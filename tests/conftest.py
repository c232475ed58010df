import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

USER_MODEL = f"{ROOT / 'tests' / 'fixtures' / 'user_model.py'}:build"


@pytest.fixture
def user_model_spec() -> str:
    return USER_MODEL


def random_mask(structures, ratio: float, seed: int = 0) -> set[str]:
    """A random mask pruning about `ratio` of every layer, always keeping one channel."""
    gen = torch.Generator().manual_seed(seed)
    keys = set()
    for layer in structures.layers:
        k = min(int(round(ratio * layer.size)), layer.size - 1)
        for c in torch.randperm(layer.size, generator=gen)[:k].tolist():
            keys.add(f"{layer.name}:{c}")
    pruned = structures.pruned_vector(keys)
    for piece in structures.segments():  # a concatenation can make one producer lose all its channels
        if bool(pruned[piece.structure].all()):
            keep = piece.structure[torch.randint(len(piece.structure), (1,), generator=gen)].item()
            pruned[keep] = False
    return {k for k, flag in zip(structures.keys, pruned.tolist()) if flag}
