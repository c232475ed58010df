"""One registry of models, looked up by a spec string; every model takes `num_classes` and `in_channels`."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import re
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from ..atomic import NotAFileError, open_regular
from ..errors import ModelSpecError
from .densenet_cifar import CifarDenseNet
from .resnet_cifar import STAGE_WIDTHS, CifarResNet
from .vgg_cifar import VGG19_WIDTHS, CifarVGG

ZOO_PATTERN = re.compile(r"^(resnet(?:20|32|44|56|110)|vgg19|densenet40)(?:x([0-9]*\.?[0-9]+))?(?::(.*))?$")
ZOO_NAMES = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg19", "densenet40")
USER_MODULE_PREFIX = "sosp_user_model_"
USER_CODE_WARNING = "This model spec imports and runs Python code from your files; load only code you trust."


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ModelSpecError(f"{what} must be a comma-separated list of integers, got '{text}'") from None
    if any(v <= 0 for v in values):
        raise ModelSpecError(f"{what} must be positive, got '{text}'")
    return values


def _parse_options(text: str | None, allowed: set[str]) -> dict[str, list[int]]:
    options: dict[str, list[int]] = {}
    if not text:
        return options
    for part in text.split(";"):
        if "=" not in part:
            raise ModelSpecError(
                f"model option '{part}' must look like key=1,2,3 (allowed keys: {sorted(allowed)})"
            )
        key, value = part.split("=", 1)
        if key.strip() not in allowed:
            raise ModelSpecError(f"unknown model option '{key}'; allowed: {sorted(allowed)}")
        options[key.strip()] = _int_list(value, key.strip())
    return options


def scaled(widths, factor: float) -> list[int]:
    """Widths multiplied by `factor`, rounded, at least one channel each."""
    return [max(1, int(round(w * factor))) for w in widths]


def _build_zoo(match: re.Match, num_classes: int, in_channels: int) -> nn.Module:
    name, mult, opts = match.group(1), match.group(2), match.group(3)
    factor = float(mult) if mult else 1.0
    if factor <= 0:
        raise ModelSpecError(f"the width multiplier of '{match.group(0)}' must be positive")
    if name.startswith("resnet"):
        options = _parse_options(opts, {"widths", "inner"})
        stage = options.get("widths", scaled(STAGE_WIDTHS, factor))
        inner = options.get("inner")
        try:
            return CifarResNet(int(name[6:]), num_classes, in_channels, tuple(stage), inner)
        except ValueError as exc:
            raise ModelSpecError(str(exc)) from None
    if name == "vgg19":
        options = _parse_options(opts, {"widths"})
        base = [w for w in VGG19_WIDTHS if w != "M"]
        widths = options.get("widths", scaled(base, factor))
        try:
            return CifarVGG(num_classes, in_channels, widths)
        except ValueError as exc:
            raise ModelSpecError(str(exc)) from None
    options = _parse_options(opts, {"growth"})
    growth = options.get("growth", scaled((12, 12, 12), factor))
    try:
        return CifarDenseNet(40, num_classes, in_channels, tuple(growth))
    except ValueError as exc:
        raise ModelSpecError(str(exc)) from None


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                setattr(
                    parent,
                    child_name,
                    nn.Conv2d(
                        in_channels,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        1 if child.groups == 1 else in_channels,
                        child.bias is not None,
                    ),
                )
                return


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    try:
        factory = torchvision.models.get_model_builder(name)
    except ValueError:
        available = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:40])
        raise ModelSpecError(f"torchvision has no model '{name}'. Some it has: {available}, ...") from None
    if factory.__module__.startswith("torchvision.models.segmentation"):
        model = PooledSegmentation(factory(weights=None, weights_backbone=None, num_classes=num_classes))
    else:
        model = factory(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


class PooledSegmentation(nn.Module):
    """A torchvision segmentation net whose dense class map, averaged over positions, is the class logits: its
    backbone and decoder wiring (dilated convs, ASPP, upsampling) analysed with the engine's classification loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"].mean((2, 3))


def _build_timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:20]
        raise ModelSpecError(
            f"timm has no model '{name}'" + (f"; similar: {', '.join(close)}" if close else "")
        )
    try:  # never a download: random init, as for torchvision
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except Exception as exc:
        raise ModelSpecError(f"timm could not build '{name}': {type(exc).__name__}: {exc}") from None


# spec scheme -> builder of NAME; the zoo names and user code (file.py:factory, package.module:factory) are
# matched apart
LIBRARY_SCHEMES: dict[str, Callable[[str, int, int], nn.Module]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
}


def load_user_module(module_name: str, path: str | Path) -> ModuleType:
    """Run a user's model file as module `module_name` (registered, so its classes pickle by reference); only a
    regular file is read (a FIFO would block the import forever)."""
    try:
        open_regular(path).close()
    except NotAFileError as exc:
        raise ModelSpecError(f"the model code {exc}") from None
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        raise ModelSpecError(f"running '{path}' failed: {type(exc).__name__}: {exc}") from None
    return module


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    target, _, attr = spec.rpartition(":")
    if not attr or not target:
        raise ModelSpecError(
            f"user model spec must be 'path/to/file.py:factory' or 'package.module:factory', got '{spec}'"
        )
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.exists():
            raise ModelSpecError(f"model file '{path}' does not exist")
        module = load_user_module(f"{USER_MODULE_PREFIX}{abs(hash(str(path.resolve())))}", path)
    else:
        _require_own_module(target, spec)
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelSpecError(f"cannot import module '{target}': {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"'{target}' has no callable named '{attr}'")
    is_module_class = inspect.isclass(factory) and issubclass(factory, nn.Module)
    if not (inspect.isfunction(factory) or is_module_class) or _is_standard_library(factory):
        raise ModelSpecError(
            f"'{spec}' is not a model factory: give a function or nn.Module class of your own code "
            "that returns a torch.nn.Module"
        )
    return factory


def _module_origin(dotted: str) -> str | None:
    """The file `dotted` would be imported from, found on sys.path without importing it or its parent packages
    (None: no such file, or a built-in / frozen module)."""
    locations: list[str] | None = None  # None: sys.path
    found = None
    for part in dotted.split("."):
        if not part.isidentifier():
            return None
        found = importlib.machinery.PathFinder.find_spec(part, locations)
        if found is None:
            return None
        locations = list(found.submodule_search_locations or [])
    return found.origin if found is not None and found.has_location else None


def _installation_folders() -> list[Path]:
    """Where Python's standard library and installed packages live (their modules are nobody's model code)."""
    paths = sysconfig.get_paths()
    folders = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    folders |= {p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")}
    return [Path(folder).resolve() for folder in folders]


def _require_own_module(target: str, spec: str) -> None:
    """Refuse `package.module:factory` before any import unless the module is a file of the user's own code: its
    import would run whatever an installed or standard module does on import (`this`, `antigravity`, ...)."""
    if target.split(".")[0] in sys.builtin_module_names or importlib.machinery.FrozenImporter.find_spec(
        target
    ):
        raise ModelSpecError(
            f"'{spec}' is not a model factory of your own code: '{target}' is built into Python; "
            "nothing was imported"
        )
    origin = _module_origin(target)
    if origin is None:
        raise ModelSpecError(
            f"no module file '{target}' of your own code was found on the Python path for '{spec}'; "
            "give path/to/file.py:factory, or run from the folder that holds your package"
        )
    path = Path(origin).resolve()
    if any(folder == path or folder in path.parents for folder in _installation_folders()):
        raise ModelSpecError(
            f"'{spec}' is not a model factory of your own code: '{target}' is a module of Python "
            f"or of an installed package ({path}); nothing was imported. Give path/to/file.py:factory "
            "or a module of your own project"
        )


def _is_standard_library(obj: object) -> bool:
    """True for callables of Python's standard library or builtins (never model factories; os:abort, ...)."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    source = getattr(module, "__file__", None)
    if module is None or source is None:
        return True
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    path = Path(source).resolve()
    return stdlib in path.parents and "site-packages" not in path.parts


def _call_factory(
    factory: Callable[..., nn.Module], spec: str, num_classes: int, in_channels: int
) -> nn.Module:
    params = inspect.signature(factory).parameters
    kwargs = {}
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    if "in_channels" in params:
        kwargs["in_channels"] = in_channels
    try:
        model = factory(**kwargs)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a user factory must not end the server or CLI
        raise ModelSpecError(f"calling the factory of '{spec}' failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"the factory of '{spec}' returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def is_user_code(spec: str) -> bool:
    """True when building this spec imports and runs the user's own Python code."""
    spec = spec.strip()
    return ":" in spec and not ZOO_PATTERN.match(spec) and spec.split(":", 1)[0] not in LIBRARY_SCHEMES


def build_model(spec: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a randomly initialised model from a spec: zoo name, `torchvision:NAME`, `timm:NAME` or
    `file.py:factory`."""
    spec = spec.strip()
    match = ZOO_PATTERN.match(spec)
    if match:
        return _build_zoo(match, num_classes, in_channels)
    scheme, _, name = spec.partition(":")
    if scheme in LIBRARY_SCHEMES:
        return LIBRARY_SCHEMES[scheme](name, num_classes, in_channels)
    if ":" in spec:
        return _call_factory(_load_factory(spec), spec, num_classes, in_channels)
    raise ModelSpecError(
        f"unknown model '{spec}'. Use a zoo model ({', '.join(ZOO_NAMES)}, e.g. resnet56, resnet32x4, "
        "resnet56:widths=16,32,128), torchvision:NAME, timm:NAME, or path/to/file.py:factory"
    )
