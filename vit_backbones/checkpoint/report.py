"""What a checkpoint load did, key by key."""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple


def _shown(keys, n: int) -> str:
    return ', '.join(keys[:n]) + (f' ... (+{len(keys) - n})' if len(keys) > n else '')


@dataclass
class LoadReport:
    """Outcome of loading a checkpoint into a backbone.

    Attributes:
        source_format: the layout that was recognised ('official', 'timm', 'hf', 'mmdet', 'ours', ...).
        loaded: our parameter and buffer names that received a value.
        resized: our names whose tensor was resampled, with (checkpoint shape, model shape).
        dropped: checkpoint keys not used, with the reason (classification head, buffer, unknown ...).
        missing: our parameter names that the checkpoint did not provide (they keep their init).
        missing_buffers: our persistent buffers (BatchNorm running statistics ...) the checkpoint did not
            provide; non-persistent buffers (recomputed tables) are not listed.
        foreign: objects of classes vit_backbones does not import, kept as inert records
            (``{'argparse.Namespace': ["['args']"]}``); never called.
        nonfinite: names loaded with NaN or inf values (only with ``allow_nonfinite=True``).
        notes: what a load changed beyond renaming, e.g. a lossy resampling and how to avoid it.
    """
    source_format: str = ''
    loaded: List[str] = field(default_factory=list)
    resized: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)
    dropped: Dict[str, str] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    missing_buffers: List[str] = field(default_factory=list)
    foreign: Dict[str, List[str]] = field(default_factory=dict)
    nonfinite: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f'checkpoint format: {self.source_format}; loaded {len(self.loaded)} tensors, '
                 f'resized {len(self.resized)}, dropped {len(self.dropped)}, missing {len(self.missing)}'
                 + (f' (+{len(self.missing_buffers)} buffers)' if self.missing_buffers else '')]
        for k, (a, b) in self.resized.items():
            lines.append(f'  resized  {k}: {tuple(a)} -> {tuple(b)}')
        by_reason: Dict[str, List[str]] = {}
        for k, why in self.dropped.items():
            by_reason.setdefault(why, []).append(k)
        for why, keys in by_reason.items():
            lines.append(f'  dropped  ({why}): {_shown(keys, 6)}')
        if self.missing:
            lines.append(f'  missing  (kept initialisation): {_shown(self.missing, 8)}')
        if self.missing_buffers:
            lines.append(f'  missing buffers (kept initialisation): {_shown(self.missing_buffers, 8)}')
        if self.nonfinite:
            lines.append(f'  loaded with NaN/inf values: {_shown(self.nonfinite, 8)}')
        if self.foreign:
            lines.append('  foreign objects kept as inert records: '
                         + '; '.join(f'{name} at {_shown(paths, 3)}' for name, paths in self.foreign.items()))
        lines += [f'  note: {n}' for n in self.notes]
        return '\n'.join(lines)

    __str__ = summary
