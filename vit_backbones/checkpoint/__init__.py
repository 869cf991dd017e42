"""Checkpoint reading, conversion and loading."""
from .errors import (CheckpointError, CheckpointFileError, CheckpointMismatchError, CheckpointNotFoundError,
                     UnsafeCheckpointError)
from .io import extract_state_dict, read_checkpoint
from .loader import CheckpointResizeWarning, load_pretrained, strip_prefix
from .report import LoadReport
from .unpickler import ForeignObject, foreign_objects

__all__ = ['extract_state_dict', 'read_checkpoint', 'CheckpointError', 'CheckpointFileError', 'CheckpointMismatchError',
           'CheckpointNotFoundError', 'UnsafeCheckpointError', 'CheckpointResizeWarning', 'load_pretrained',
           'strip_prefix', 'LoadReport', 'ForeignObject', 'foreign_objects']
