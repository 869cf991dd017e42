"""The errors of checkpoint reading and loading: one family, so tools can catch :class:`CheckpointError`."""
import pickle


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file, the problem and
    the fix."""


class CheckpointFileError(CheckpointError):
    """The file is missing, empty, damaged, not a checkpoint, not a state dict, or holds bad values."""


class CheckpointNotFoundError(CheckpointFileError, FileNotFoundError):
    """The checkpoint path does not exist."""


class UnsafeCheckpointError(CheckpointFileError, pickle.UnpicklingError):
    """Restoring the file would call a function or class that vit_backbones does not allow."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not belong to this backbone (or to this variant of it)."""
