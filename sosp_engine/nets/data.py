"""Data specs -> train / validation / test datasets, with the number of classes and the input shape."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..atomic import NotAFileError, open_regular, read_regular
from ..errors import DataSpecError

DIGITS_SIZE = 16
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
SYNTHETIC_TRAIN = 256
SYNTHETIC_MAX = 100_000
MAX_CIFAR_BATCH_BYTES = 256 << 20  # a CIFAR python batch is about 31 MB
MAX_IMAGE_PIXELS = 64_000_000  # an image folder's image, before it is decoded (~190 MB as RGB)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TransformedTensors(Dataset):
    """Images held as one tensor, with an optional per-sample transform (augmentation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


@dataclass
class DataBundle:
    """The splits of one data set; `train_eval` is the training split without augmentation (for analyses)."""

    spec: str
    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    note: str = ""  # what the loader does to the data that a user should know (resizing), in words

    def loader(
        self,
        split: str,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> DataLoader:
        """A DataLoader over one split (its first `limit` samples if given); shuffling is seeded so runs repeat."""
        dataset = {"train": self.train, "train_eval": self.train_eval, "val": self.val, "test": self.test}[
            split
        ]
        if limit is not None and limit < len(dataset):
            dataset = Subset(dataset, range(max(limit, 1)))
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=num_workers,
            drop_last=False,
        )

    def analysis_samples(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """N' samples drawn with a seed from the training split, without augmentation."""
        total = len(self.train_eval)
        if n <= 0:
            raise DataSpecError(f"the number of analysis samples must be positive, got {n}")
        n = min(n, total)
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()
        xs, ys = zip(*(self.train_eval[i] for i in idx))
        return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)


def _split(n: int, sizes: tuple[int, int], seed: int) -> tuple[list[int], list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a, b = sizes
    return perm[a + b :], perm[:a], perm[a : a + b]


def _digits() -> DataBundle:
    from sklearn.datasets import load_digits
    import torch.nn.functional as F
    from torchvision.transforms import v2

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, val_idx, test_idx = _split(len(labels), (180, 360), seed=2022)
    augment = v2.RandomCrop(DIGITS_SIZE, padding=1, padding_mode="edge")
    train = TransformedTensors(images[train_idx], labels[train_idx], augment)
    return DataBundle(
        "digits",
        train,
        TransformedTensors(images[train_idx], labels[train_idx]),
        TransformedTensors(images[val_idx], labels[val_idx]),
        TransformedTensors(images[test_idx], labels[test_idx]),
        10,
        (1, DIGITS_SIZE, DIGITS_SIZE),
    )


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR python batches without running code: only numpy arrays and plain containers may be rebuilt."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load '{module}.{name}': a CIFAR batch holds only arrays, "
                "lists, bytes, strings and numbers"
            )
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        batch = CifarUnpickler(
            io.BytesIO(read_regular(path, MAX_CIFAR_BATCH_BYTES)), encoding="latin1"
        ).load()
    except Exception as exc:
        raise DataSpecError(f"cannot read CIFAR batch '{path}': {str(exc)[:200]}") from None
    if not isinstance(batch, dict) or "data" not in batch:
        raise DataSpecError(f"'{path}' is not a CIFAR python batch (no 'data' entry)")
    return batch


def _find_cifar_dir(root: Path, name: str) -> Path:
    marker = "data_batch_1" if name == "cifar10" else "train"
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    for candidate in (root, root / sub):
        if (candidate / marker).is_file():
            return candidate
    raise DataSpecError(
        f"no {name.upper()} python batches under '{root}' (looked for {marker} in it and in {sub}/). "
        f"Point the spec at the folder that holds them, or download them explicitly (CLI: --download)."
    )


def _cifar(name: str, path: str, download: bool) -> DataBundle:
    from torchvision.transforms import v2

    root = Path(path).expanduser()
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)
        except OSError as exc:  # URLError is an OSError: no network, a proxy, a full disk
            raise DataSpecError(
                f"downloading {name.upper()} into '{root}' failed ({exc}); download the python "
                "batches by hand and point the spec at their folder"
            ) from None
    if not root.exists():
        raise DataSpecError(f"data path '{root}' does not exist")
    folder = _find_cifar_dir(root, name)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test_files = ["test_batch"] if name == "cifar10" else ["test"]

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [_read_pickle(folder / f) for f in files if (folder / f).is_file()]
        if len(batches) != len(files):
            raise DataSpecError(f"'{folder}' lacks some of the {name.upper()} batches: {files}")
        try:
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(
                -1, 3, 32, 32
            )
            labels = np.concatenate([np.asarray(b[label_key]).reshape(-1) for b in batches])
        except (KeyError, ValueError, TypeError) as exc:
            raise DataSpecError(
                f"the {name.upper()} batches in '{folder}' have an unexpected layout: {exc}"
            ) from None
        classes = 10 if name == "cifar10" else 100
        where = f"the {name.upper()} batches {files} in '{folder}'"
        if len(data) == 0:
            raise DataSpecError(f"{where} hold no images")
        if len(labels) != len(data):
            raise DataSpecError(f"{where} hold {len(data)} images but {len(labels)} labels")
        if not np.issubdtype(labels.dtype, np.integer):  # 0.5 would silently become class 0
            raise DataSpecError(f"{where} have labels of type {labels.dtype}, not whole class numbers")
        if labels.min() < 0 or labels.max() >= classes:
            raise DataSpecError(
                f"{where} have labels outside 0..{classes - 1} ({labels.min()} .. {labels.max()})"
            )
        return torch.as_tensor(data, dtype=torch.uint8), torch.as_tensor(
            labels.astype(np.int64), dtype=torch.long
        )

    x_train, y_train = read(train_files)
    x_test, y_test = read(test_files)
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN[name], CIFAR_STD[name])]
    plain = v2.Compose(normalize)
    augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *normalize])
    n_val = max(1, len(y_train) // 10)
    train_idx, val_idx, _ = _split(len(y_train), (n_val, 0), seed=2022)
    return DataBundle(
        name,
        TransformedTensors(x_train[train_idx], y_train[train_idx], augment),
        TransformedTensors(x_train[train_idx], y_train[train_idx], plain),
        TransformedTensors(x_train[val_idx], y_train[val_idx], plain),
        TransformedTensors(x_test, y_test, plain),
        10 if name == "cifar10" else 100,
        (3, 32, 32),
    )


def _image(path: str):
    """One RGB image of an image folder; a file that is no readable image is named, so the user can remove it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_regular(path) as fh:
            image = Image.open(fh)  # reads the header only: the declared size is checked before decoding
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataSpecError(
                    f"'{path}' in the image folder declares {image.width}x{image.height} pixels, "
                    f"more than {MAX_IMAGE_PIXELS:,}: shrink or remove it"
                )
            return image.convert("RGB")
    except NotAFileError as exc:
        raise DataSpecError(f"{exc}; it is in the image folder: remove it") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataSpecError(
            f"'{path}' in the image folder is not a readable image ({type(exc).__name__}): "
            "remove or replace it"
        ) from None


def _imagefolder(path: str, image_size: int = 224) -> DataBundle:
    import torchvision
    from torchvision.transforms import v2

    root = Path(path).expanduser()
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataSpecError(
                f"'{root}' must hold 'train/' and 'val/' folders of class sub-folders; '{folder}' is missing"
            )
    normalize = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    augment = v2.Compose([v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip(), *normalize])
    plain = v2.Compose([v2.Resize(int(image_size * 8 / 7)), v2.CenterCrop(image_size), *normalize])
    try:
        train = torchvision.datasets.ImageFolder(str(root / "train"), augment, loader=_image)
        train_eval = torchvision.datasets.ImageFolder(str(root / "train"), plain, loader=_image)
        val = torchvision.datasets.ImageFolder(str(root / "val"), plain, loader=_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataSpecError(f"image folder '{root}' is unusable: {exc}") from None
    if train.classes != val.classes:
        raise DataSpecError(f"'{root}/train' and '{root}/val' have different class folders")
    if len(train.classes) < 2:
        raise DataSpecError(
            f"'{root}/train' has {len(train.classes)} class folder ({', '.join(train.classes)}): a "
            "classifier needs at least 2 classes, one sub-folder of images each"
        )
    return DataBundle(
        f"imagefolder:{root}",
        train,
        train_eval,
        val,
        val,
        len(train.classes),
        (3, image_size, image_size),
        note=f"images of any size are resized to {int(image_size * 8 / 7)} pixels on the short side and centre-"
        f"cropped to {image_size}x{image_size} (training: random resized crops of {image_size}x{image_size})",
    )


def _synthetic(shape_text: str, classes_text: str) -> DataBundle:
    """Seeded random images: C,H,W and K classes, optionally :N training samples (default 256)."""
    classes_text, _, count_text = classes_text.partition(":")
    try:
        shape = tuple(int(v) for v in shape_text.split(","))
        classes = int(classes_text)
        count = int(count_text) if count_text else SYNTHETIC_TRAIN
    except ValueError:
        raise DataSpecError(
            f"synthetic spec must be 'synthetic:C,H,W:K[:N]' with integers, got "
            f"'{shape_text}:{classes_text}{':' + count_text if count_text else ''}'"
        ) from None
    if len(shape) != 3 or min(shape) <= 0 or classes < 2 or not 1 <= count <= SYNTHETIC_MAX:
        raise DataSpecError(
            f"synthetic spec needs three positive sizes C,H,W, at least 2 classes and 1 .. "
            f"{SYNTHETIC_MAX} training samples"
        )
    gen = torch.Generator().manual_seed(0)
    sets = []
    for n in (count, 64, 64):
        sets.append(
            TensorDataset(
                torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)
            )
        )
    suffix = f":{count}" if count_text else ""
    return DataBundle(
        f"synthetic:{shape_text}:{classes}{suffix}", sets[0], sets[0], sets[1], sets[2], classes, shape
    )


def load_data(spec: str, download: bool = False) -> DataBundle:
    """Turn a data spec (`digits`, `cifar10:PATH`, `cifar100:PATH`, `imagefolder:PATH`,
    `synthetic:C,H,W:K[:N]`) into splits."""
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "digits" and not rest:
        return _digits()
    if kind in ("cifar10", "cifar100"):
        if not rest:
            raise DataSpecError(f"'{kind}' needs a path: {kind}:/path/to/data")
        return _cifar(kind, rest, download)
    if kind == "imagefolder":
        if not rest:
            raise DataSpecError("'imagefolder' needs a path: imagefolder:/path/with/train/and/val")
        return _imagefolder(rest)
    if kind == "synthetic":
        shape_text, _, classes_text = rest.partition(":")
        return _synthetic(shape_text, classes_text)
    raise DataSpecError(
        f"unknown data spec '{spec}'; use digits, cifar10:PATH, cifar100:PATH, imagefolder:PATH or synthetic:C,H,W:K"
    )


def check_model_fits_data(model: torch.nn.Module, data: DataBundle) -> None:
    """Run one sample through the model; a shape mismatch becomes a DataSpecError naming both shapes."""
    x = data.test[0][0].unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        raise DataSpecError(
            f"the model cannot take inputs of shape {tuple(data.input_shape)} from '{data.spec}': "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise DataSpecError(
            f"the model outputs shape {tuple(out.shape)}, but '{data.spec}' has {data.num_classes} classes"
        )


def example_input(data: DataBundle, batch: int = 1) -> torch.Tensor:
    """A random input batch of the data set's shape (for tracing and counting)."""
    return torch.randn(batch, *data.input_shape, generator=torch.Generator().manual_seed(0))
