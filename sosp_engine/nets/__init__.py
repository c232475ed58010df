"""The model zoo: CIFAR ResNets, VGG-19, DenseNet-40, torchvision models and user factories."""

from .registry import USER_CODE_WARNING, ZOO_NAMES, build_model, is_user_code, scaled
from .checkpoints import load_weights, read_checkpoint, weights_fingerprint, zero_layers

__all__ = [
    "USER_CODE_WARNING",
    "ZOO_NAMES",
    "build_model",
    "is_user_code",
    "scaled",
    "load_weights",
    "read_checkpoint",
    "weights_fingerprint",
    "zero_layers",
]
