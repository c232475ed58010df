"""One model setup (what net, on what data, with what weights, what is never pruned, where it runs), nested whole in
every config that needs a model, and how a config is read back from its stored JSON in today's or an older shape."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_type_hints

from pydantic import ConfigDict, Field, ValidationError, with_config

from ..errors import SospError
from ..options import first_fault, read_config

Config = TypeVar("Config")

STORED_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
stored_config = with_config(STORED_CONFIG)  # a config read back from JSON: exact types, no unknown fields


def default_preset(model_spec: str) -> str | None:
    """The paper's exclusions: the downsampling path of ResNets; nothing for other models."""
    spec = model_spec.strip()
    if spec.startswith("resnet"):
        return "cifar-resnet"
    if spec.startswith(("torchvision:resnet", "torchvision:resnext", "torchvision:wide_resnet")):
        return "torchvision-resnet"
    return None


def resolve_preset(model_spec: str, preset: str | None) -> str | None:
    """'auto' -> the paper's default for the model, 'none' / None -> no preset, else the preset named."""
    if preset == "auto":
        return default_preset(model_spec)
    return None if preset in (None, "none") else preset


@stored_config
@dataclass(frozen=True)
class ModelSetup:
    """What defines the net an analysis, training or study works on; every config nests one, none copies its fields.

    `weights` is a checkpoint path (a plain state_dict or a pruned checkpoint) or None for a random init; `exclude`
    holds module-name patterns never pruned, `preset` a named exclusion set ('auto': the paper's for the model).
    """

    model_spec: Annotated[
        str,
        Field(
            json_schema_extra={"flag": "--model"},
            title="Model spec",
            description="zoo name (resnet20/32/56/110, x2, :widths=16,32,128, vgg19, densenet40), torchvision:NAME, "
            "timm:NAME or file.py:factory",
        ),
    ] = "resnet20"
    data_spec: Annotated[
        str,
        Field(
            json_schema_extra={"flag": "--data"},
            title="Data spec",
            description="digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH | synthetic:C,H,W:K",
        ),
    ] = "digits"
    weights: Annotated[
        str | None,
        Field(
            title="Weights",
            description="a checkpoint: a state_dict, {'state_dict': ...}, {'model': ...} or a pruned checkpoint "
            "(loaded with weights_only=True); none: a random init",
        ),
    ] = None
    exclude: Annotated[
        tuple[str, ...],
        Field(title="Never pruned", description="module name patterns never to prune (fnmatch)"),
    ] = ()
    preset: Annotated[
        str | None,
        Field(
            title="Exclusion preset",
            description="auto (the paper's for the model), none, cifar-resnet or torchvision-resnet",
        ),
    ] = "auto"
    device: Annotated[
        str, Field(title="Device", description="auto (a GPU where there is one), cpu, cuda or cuda:N")
    ] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "exclude", tuple(self.exclude)
        )  # a value: hashable, equal whatever it was given as

    @property
    def preset_name(self) -> str | None:
        """The exclusion preset that applies ('auto' resolved for this model)."""
        return resolve_preset(self.model_spec, self.preset)

    def with_weights(self, weights: str | None) -> "ModelSetup":
        """This setup with other weights (a trained checkpoint of the same net, or None for a random init)."""
        return dataclasses.replace(self, weights=weights)


def config_from_dict(cls: type[Config], data: dict[str, Any]) -> Config:
    """A config dataclass from its stored dict, its values checked against their declared types (an error names the
    field, e.g. `training.epochs`); nested configs are rebuilt too.

    Configs stored before their parts were nested hold those parts' fields flat: each nested part (in the order the
    class declares them) takes the flat fields it names that are not the outer class's own.
    """
    nested = _nested(cls, data)
    try:
        return read_config(cls, nested)
    except ValidationError as exc:
        raise SospError(f"a stored {cls.__name__} {first_fault(exc)}") from None


def _nested(cls: type, data: Any) -> dict[str, Any]:
    """The stored dict in today's nested shape (older flat fields moved into the parts that declare them)."""
    if not isinstance(data, dict):
        raise SospError(f"a stored {cls.__name__} must be a JSON object, got {type(data).__name__}")
    flat = dict(data)
    hints = get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints.get(f.name))}
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            if isinstance(flat.get(f.name), dict):
                flat[f.name] = _nested(kind, flat[f.name])
            elif f.name not in flat:
                names = {g.name for g in dataclasses.fields(kind)} - own
                flat[f.name] = _nested(kind, {n: flat.pop(n) for n in list(flat) if n in names})
    return flat


def stored_setup(config: dict) -> ModelSetup:
    """The model setup of a stored config (a job's, an analysis's) in today's shape or the older flat one."""
    if isinstance(config.get("setup"), dict):
        return config_from_dict(ModelSetup, config["setup"])
    names = {f.name for f in dataclasses.fields(ModelSetup)}
    return config_from_dict(ModelSetup, {k: v for k, v in config.items() if k in names})
