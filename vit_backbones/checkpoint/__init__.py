"""Checkpoint reading, conversion and loading."""
from .io import extract_state_dict, read_checkpoint
from .loader import CheckpointMismatchError, load_pretrained, strip_prefix
from .report import LoadReport

__all__ = ['extract_state_dict', 'read_checkpoint', 'CheckpointMismatchError', 'load_pretrained', 'strip_prefix',
           'LoadReport']
