"""What a checkpoint load did, key by key."""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple


@dataclass
class LoadReport:
    """Outcome of loading a checkpoint into a backbone.

    Attributes:
        source_format: the layout that was recognised ('official', 'timm', 'hf', 'mmdet', 'ours', ...).
        loaded: our parameter names that received a value.
        resized: our names whose tensor was resampled, with (checkpoint shape, model shape).
        dropped: checkpoint keys not used, with the reason (classification head, buffer, unknown ...).
        missing: our parameter names that the checkpoint did not provide (they keep their init).
    """
    source_format: str = ''
    loaded: List[str] = field(default_factory=list)
    resized: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)
    dropped: Dict[str, str] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f'checkpoint format: {self.source_format}; loaded {len(self.loaded)} tensors, '
                 f'resized {len(self.resized)}, dropped {len(self.dropped)}, missing {len(self.missing)}']
        for k, (a, b) in self.resized.items():
            lines.append(f'  resized  {k}: {tuple(a)} -> {tuple(b)}')
        by_reason: Dict[str, List[str]] = {}
        for k, why in self.dropped.items():
            by_reason.setdefault(why, []).append(k)
        for why, keys in by_reason.items():
            shown = ', '.join(keys[:6]) + (f' ... (+{len(keys) - 6})' if len(keys) > 6 else '')
            lines.append(f'  dropped  ({why}): {shown}')
        if self.missing:
            shown = ', '.join(self.missing[:8]) + (f' ... (+{len(self.missing) - 8})' if len(self.missing) > 8 else '')
            lines.append(f'  missing  (kept initialisation): {shown}')
        return '\n'.join(lines)

    __str__ = summary
