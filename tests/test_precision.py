"""Analyses run CUDA convolutions and matrix products in IEEE float32, not TF32, and give the user's setting back."""

import threading

import pytest
import torch
from torch import nn

from sosp_engine.devices import full_float32
from sosp_engine.saliency.common import AnalysisInputs
from sosp_engine.saliency.homogeneity import not_scaling
from sosp_engine.saliency.sosp_h import sosp_h_terms
from sosp_engine.saliency.sosp_i import gauss_newton_terms
from sosp_engine.pruning.offered import find_structures

CUDNN, MATMUL = torch.backends.cudnn, torch.backends.cuda.matmul


def tf32_allowed() -> tuple[bool, bool]:
    return CUDNN.allow_tf32, MATMUL.allow_tf32


@pytest.fixture(autouse=True)
def users_tf32():
    """The user (or cuDNN's default) allows TF32 for both; each test leaves torch's switches as they were."""
    saved = tf32_allowed()
    CUDNN.allow_tf32 = MATMUL.allow_tf32 = True
    yield
    CUDNN.allow_tf32, MATMUL.allow_tf32 = saved


def test_full_float32_turns_tf32_off_inside_and_restores_it_after():
    with full_float32():
        assert tf32_allowed() == (False, False)
    assert tf32_allowed() == (True, True)


def test_full_float32_restores_the_setting_after_an_error():
    with pytest.raises(ValueError):
        with full_float32():
            raise ValueError("analysis failed")
    assert tf32_allowed() == (True, True)


def test_per_operator_flags_set_with_torchs_newer_api_come_back_as_they_were():
    CUDNN.conv.fp32_precision, CUDNN.rnn.fp32_precision = "tf32", "ieee"
    try:
        with full_float32():
            assert tf32_allowed() == (False, False)
        assert (CUDNN.conv.fp32_precision, CUDNN.rnn.fp32_precision) == ("tf32", "ieee")
    finally:
        CUDNN.allow_tf32 = True


def test_overlapping_analyses_keep_tf32_off_until_the_last_one_leaves():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[bool, bool]] = []

    def first():
        with full_float32():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with full_float32():
        second_in.set()
        first_out.wait(5)
        seen.append(tf32_allowed())
    thread.join(5)
    assert seen == [(False, False)] and tf32_allowed() == (True, True)


class Recorder(nn.Conv2d):
    """A convolution that notes whether TF32 was allowed whenever it ran."""

    seen: list[bool]

    def forward(self, x):
        self.seen.append(CUDNN.allow_tf32)
        return super().forward(x)


def recording_inputs() -> AnalysisInputs:
    torch.manual_seed(0)
    conv = Recorder(2, 4, 3, padding=1)
    conv.seen = []
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(6, 2, 5, 5)
    structures = find_structures(model, x[:1])
    conv.seen.clear()  # tracing the structures is not part of the analysis
    return AnalysisInputs(model, structures, x, torch.randint(0, 3, (6,)), "cross-entropy", 3)


@pytest.mark.parametrize(
    "step", [not_scaling, sosp_h_terms, gauss_newton_terms], ids=["exact-scaling check", "sosp-h", "sosp-i"]
)
def test_each_analysis_step_runs_its_convolutions_in_ieee_float32(step):
    inputs = recording_inputs()
    step(inputs)
    assert inputs.model[0].seen and set(inputs.model[0].seen) == {False}
    assert tf32_allowed() == (True, True)
