import pytest
import torch

from sosp_engine.errors import CheckpointError
from sosp_engine.nets import build_model, load_weights


@pytest.fixture
def trained_state():
    torch.manual_seed(1)
    return build_model("resnet20", 10, 1).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s},
        lambda s: {"module." + k: v for k, v in s.items()},
        lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},
    ],
)
def test_each_wrapper_form_loads(tmp_path, trained_state, wrap):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(trained_state), path)
    model = load_weights(build_model("resnet20", 10, 1), path)
    assert torch.equal(model.conv1.weight, trained_state["conv1.weight"])


def test_missing_keys_are_listed(tmp_path, trained_state):
    del trained_state["linear.bias"]
    torch.save(trained_state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): linear.bias"):
        load_weights(build_model("resnet20", 10, 1), tmp_path / "c.pt")


def test_unexpected_keys_are_listed(tmp_path, trained_state):
    trained_state["extra.weight"] = torch.zeros(1)
    torch.save(trained_state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra.weight"):
        load_weights(build_model("resnet20", 10, 1), tmp_path / "c.pt")


def test_misshaped_keys_are_listed(tmp_path, trained_state):
    torch.save(trained_state, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"mis-shaped keys .*linear.weight: checkpoint \(10, 64\) vs model \(5, 64\)"
    ):
        load_weights(build_model("resnet20", 5, 1), tmp_path / "c.pt")


def test_pickled_module_is_refused(tmp_path):
    torch.save(build_model("resnet20"), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="weights file"):
        load_weights(build_model("resnet20"), tmp_path / "whole.pt")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(build_model("resnet20"), tmp_path / "nope.pt")
