"""Exceptions with messages meant for the user: what went wrong and what to do."""


class SospError(Exception):
    """Base class of every error the engine raises on bad input."""


class ModelSpecError(SospError):
    """A model spec string cannot be turned into a model."""


class CheckpointError(SospError):
    """A checkpoint cannot be loaded into the model."""


class DataSpecError(SospError):
    """A data spec string cannot be turned into data loaders."""


class MaskError(SospError):
    """A mask does not fit the model it is applied to."""


class AnalysisError(SospError):
    """An analysis cannot be run or loaded as asked."""
