import pickle

import numpy as np
import pytest
import torch

from sosp_engine.nets.data import check_model_fits_data, load_data
from sosp_engine.errors import DataSpecError
from sosp_engine.nets import build_model


def test_digits_loads_offline_with_fixed_split():
    data = load_data("digits")
    assert (len(data.train), len(data.val), len(data.test)) == (1257, 180, 360)
    assert data.num_classes == 10 and data.input_shape == (1, 16, 16)
    again = load_data("digits")
    assert torch.equal(data.test[0][0], again.test[0][0])


def test_analysis_samples_are_seeded():
    data = load_data("digits")
    x1, y1 = data.analysis_samples(50, seed=3)
    x2, y2 = data.analysis_samples(50, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (50, 1, 16, 16)


def _fake_cifar(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)


def test_fake_cifar10_folder_loads(tmp_path):
    _fake_cifar(tmp_path)
    data = load_data(f"cifar10:{tmp_path}")
    assert len(data.train) + len(data.val) == 100 and len(data.test) == 20
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_cifar_folder_without_batches_fails_clearly(tmp_path):
    with pytest.raises(DataSpecError, match="no CIFAR10 python batches"):
        load_data(f"cifar10:{tmp_path}")


def test_missing_path_fails_clearly(tmp_path):
    with pytest.raises(DataSpecError, match="does not exist"):
        load_data(f"cifar100:{tmp_path / 'nope'}")


def test_imagefolder_needs_train_and_val(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataSpecError, match="'val/' folders"):
        load_data(f"imagefolder:{tmp_path}")


def test_imagefolder_with_empty_class_folders_fails_clearly(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(DataSpecError, match="unusable"):
        load_data(f"imagefolder:{tmp_path}")


def test_imagefolder_loads_images(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), color=(10, 200, 30)).save(tmp_path / split / cls / "a.png")
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.num_classes == 2 and data.train_eval[0][0].shape == (3, 224, 224)


def test_synthetic_spec():
    data = load_data("synthetic:3,8,8:5")
    assert data.num_classes == 5 and data.train[0][0].shape == (3, 8, 8)


def test_synthetic_spec_takes_an_optional_training_set_size():
    data = load_data("synthetic:3,8,8:5:1200")
    assert len(data.train) == 1200 and len(data.val) == 64 and data.spec == "synthetic:3,8,8:5:1200"


@pytest.mark.parametrize(
    "spec",
    [
        "mnist",
        "synthetic:3,8:5",
        "cifar10",
        "synthetic:a,b,c:2",
        "synthetic:3,8,8:5:0",
        "synthetic:3,8,8:5:x",
    ],
)
def test_bad_data_specs_fail_clearly(spec):
    with pytest.raises(DataSpecError):
        load_data(spec)


def test_model_data_shape_mismatch_is_named():
    with pytest.raises(DataSpecError, match=r"cannot take inputs of shape \(1, 16, 16\)"):
        check_model_fits_data(build_model("resnet20", 10, 3), load_data("digits"))


def test_model_class_count_mismatch_is_named():
    with pytest.raises(DataSpecError, match="has 10 classes"):
        check_model_fits_data(build_model("resnet20", 7, 1), load_data("digits"))


def test_an_image_folder_says_how_its_images_are_resized(tmp_path, capsys):
    import json

    from PIL import Image

    from sosp_engine.cli.main import main

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (40, 30)).save(tmp_path / split / label / "a.png")
    assert (
        main(
            [
                "info",
                "--model",
                "resnet20x0.25",
                "--data",
                f"imagefolder:{tmp_path}",
                "--out",
                str(tmp_path / "i.json"),
            ]
        )
        == 0
    )
    note = json.loads((tmp_path / "i.json").read_text())["data_note"]
    assert "resized to 256 pixels on the short side" in note and "224x224" in note
