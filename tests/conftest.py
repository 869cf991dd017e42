"""Make the source checkout importable when pytest is run as ``pytest`` (not ``python -m pytest``)."""
import os.path as osp
import sys

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
