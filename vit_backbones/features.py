"""Feature extraction for custom heads: one call from a backbone name to its pyramid.

>>> from vit_backbones import extract_features
>>> levels = extract_features('Swin', 'photo.jpg', arch='tiny', checkpoint='swin_tiny_patch4_window7_224.pth')
>>> [(f.stride, f.channels, tuple(f.tensor.shape)) for f in levels]
[(4, 96, (1, 96, 120, 160)), (8, 192, (1, 192, 60, 80)), ...]

or, to reuse the model over many images, :class:`FeatureExtractor`.

Preprocessing follows what the classification checkpoints were trained with (:func:`data_config`):
RGB in [0, 1], normalised with the ImageNet mean / std (every backbone of this package; a model class may
override it with a ``data_config`` class attribute). The resize policy is the dense-prediction one,
chosen by ``short_side`` / ``max_size``:

- ``short_side=None`` (default): **no resize**; the image is used at its own size (any H, W at least the
  model's total stride works; the maps have ``ceil(H / stride) x ceil(W / stride)`` cells).
- ``short_side=N``: keep the aspect ratio, scale so the short side is N (``max_size=M`` additionally caps
  the long side at M, as mmdet's ``Resize(scale=(1333, 800), keep_ratio=True)`` does with N=800, M=1333).
- ``short_side='pretrain'``: resize to the pre-training input size (e.g. 224x224; aspect not kept), the
  classification setting.

Resizing uses the checkpoint's interpolation (bicubic for every model here) on the float image with
antialiasing, as PIL does for the training pipelines.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .registry import get_backbone_class

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


class FeatureInfo(list):
    """The pyramid a backbone offers: one dict per level (``num_chs``, ``reduction``, ``module``), indexable
    and iterable like the plain list it extends, plus timm's accessors.

    ``channels()``, ``reduction()`` and ``module_name()`` give the values of the returned levels
    (``out_indices``) in output order, or of level ``idx`` (an int, or a sequence of ints) when given.
    """

    def __init__(self, levels: Sequence[dict] = (), out_indices: Optional[Sequence[int]] = None):
        super().__init__(dict(level) for level in levels)
        self.out_indices = tuple(range(len(self)) if out_indices is None else out_indices)

    def get(self, key: str, idx: Union[None, int, Sequence[int]] = None):
        if idx is None:
            return [self[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: Union[None, int, Sequence[int]] = None):
        return self.get('num_chs', idx)

    def reduction(self, idx: Union[None, int, Sequence[int]] = None):
        return self.get('reduction', idx)

    def module_name(self, idx: Union[None, int, Sequence[int]] = None):
        return self.get('module', idx)

    def get_dicts(self) -> List[dict]:
        """The returned levels' dicts, in output order."""
        return [dict(self[i]) for i in self.out_indices]


def data_config(model) -> dict:
    """Preprocessing of a backbone's classification checkpoints: ``mean``, ``std`` (0-1 scale),
    ``input_size`` (C, H, W of pre-training), ``interpolation``.

    ``model`` is a backbone instance or class (or its registered name). A class attribute ``data_config``
    (a dict) overrides the defaults: ImageNet mean/std, bicubic, and the model's pre-training size
    (``img_size`` / ``pretrain_img_size`` where the model keeps one, else 224).
    """
    if isinstance(model, str):
        model = get_backbone_class(model)
    cfg = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(3, 224, 224), interpolation='bicubic')
    if not isinstance(model, type):
        size = None
        if getattr(model, 'pos_grid', None) is not None and getattr(model, 'patch_size', None):
            g, p = model.pos_grid, model.patch_size
            size = (g[0] * p, g[1] * p)
        elif getattr(model, 'pretrain_img_size', None):
            s = model.pretrain_img_size
            size = (s, s) if isinstance(s, int) else tuple(s)
        if size is not None:
            cfg['input_size'] = (getattr(model, 'in_chans', 3), ) + tuple(int(v) for v in size)
    cfg.update(getattr(model, 'data_config', None) or {})
    return cfg


def parse_arch(arch: Optional[str]):
    """Command-line ``--arch``: a variant name, or a JSON dict of hyper-parameters (``'{"base": "tiny"}'``)."""
    if arch is None or not arch.lstrip().startswith('{'):
        return arch
    import json
    try:
        return json.loads(arch)
    except json.JSONDecodeError as e:
        raise ValueError(f'--arch looks like a JSON dict but does not parse: {e}') from e


@dataclass
class FeatureLevel:
    """One pyramid level: ``tensor`` is (B, C, H, W)."""
    level: int
    stride: int
    channels: int
    tensor: torch.Tensor


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file as an RGB uint8 array (H, W, 3), with a clear error for an unreadable file."""
    from PIL import Image, UnidentifiedImageError
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert('RGB'))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f'cannot read image {path}: {type(e).__name__}: {e}') from e


def image_size(path: Union[str, os.PathLike]) -> Tuple[int, int]:
    """(H, W) of an image file from its header (cheap); raises ValueError if it is not an image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(os.fspath(path)) as im:
            w, h = im.size
            return h, w
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f'cannot read image {os.fspath(path)}: {type(e).__name__}: {e}') from e


def target_size(hw: Tuple[int, int], short_side: Union[None, int, str] = None, max_size: Optional[int] = None,
                pretrain_size: Tuple[int, int] = (224, 224)) -> Tuple[int, int]:
    """The (H, W) an image of size ``hw`` is resized to under the resize policy (see the module doc)."""
    h, w = int(hw[0]), int(hw[1])
    if short_side is None or short_side == 'none':
        return h, w
    if short_side == 'pretrain':
        return tuple(int(v) for v in pretrain_size)
    if isinstance(short_side, str):
        if not short_side.isdigit():
            raise ValueError(f"short_side must be None, 'none', 'pretrain' or a number of pixels, got {short_side!r}")
        short_side = int(short_side)
    scale = short_side / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class FeatureExtractor:
    """A backbone plus its preprocessing, returning the pyramid of an image.

    Args:
        name: registered backbone name (``vit_backbones.list_backbones()``).
        arch: variant name or dict (None: the backbone's default variant).
        checkpoint: path or state dict in any layout the backbone loads (official, timm, HF transformers,
            mmdet/mmseg, ours); the load report is in ``self.load_report``.
        short_side, max_size: the resize policy (module doc); default no resize.
        device: where the model runs.
        mean, std, interpolation: override :func:`data_config`.
        **model_kwargs: construction arguments of the backbone (``out_indices``, ``img_size``, ...).
    """

    def __init__(self, name: str, arch=None, checkpoint=None, short_side: Union[None, int, str] = None,
                 max_size: Optional[int] = None, device: Union[str, torch.device] = 'cpu',
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 interpolation: Optional[str] = None, **model_kwargs):
        if arch is not None:
            model_kwargs['arch'] = arch
        self.name = name
        self.model = get_backbone_class(name)(**model_kwargs)  # without arch: the backbone's default variant
        if checkpoint is not None:
            self.model.load_checkpoint(checkpoint)
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.load_report = self.model.load_report
        cfg = data_config(self.model)
        if mean is not None:
            cfg['mean'] = tuple(mean)
        if std is not None:
            cfg['std'] = tuple(std)
        if interpolation is not None:
            cfg['interpolation'] = interpolation
        self.data_config = cfg
        self.short_side, self.max_size = short_side, max_size
        target_size((32, 32), short_side, max_size)  # validate the policy now

    @property
    def arch_name(self) -> str:
        return getattr(self.model, 'arch_name', '?')

    @property
    def strides(self) -> List[int]:
        return list(self.model.out_strides)

    @property
    def channels(self) -> List[int]:
        return list(self.model.out_channels)

    def target_size(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        return target_size(hw, self.short_side, self.max_size, self.data_config['input_size'][1:])

    def to_tensor(self, image) -> torch.Tensor:
        """An image (file path, PIL image, HWC uint8 array, or a (3, H, W) / (B, 3, H, W) tensor: uint8 in
        [0, 255] or float in [0, 1]) -> the float (B, 3, H, W) batch in [0, 1], not yet resized."""
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image)
        if not isinstance(image, (np.ndarray, torch.Tensor)):  # PIL image
            image = np.asarray(image.convert('RGB'))
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] not in (3, 4):
                raise ValueError(f'expected an (H, W, 3) image array, got shape {image.shape}')
            x = torch.from_numpy(np.array(image[..., :3], copy=True)).permute(2, 0, 1)[None]
        else:
            x = image[None] if image.ndim == 3 else image
            if x.ndim != 4:
                raise ValueError(f'expected a (3, H, W) or (B, 3, H, W) image tensor, got shape {tuple(image.shape)}')
        if x.dtype == torch.uint8:
            x = x.float() / 255.
        elif not x.is_floating_point():
            raise TypeError(f'image tensors must be uint8 (0-255) or float (0-1), got {x.dtype}')
        return x.float()

    def preprocess(self, image) -> torch.Tensor:
        """Image -> normalised (B, 3, H, W) float tensor on the model's device, resized by the policy."""
        x = self.to_tensor(image).to(self.device)
        hw = self.target_size(tuple(x.shape[-2:]))
        if hw != tuple(x.shape[-2:]):
            mode = self.data_config['interpolation']
            kw = dict(align_corners=False, antialias=True) if mode in ('bilinear', 'bicubic') else {}
            x = F.interpolate(x, size=hw, mode=mode, **kw).clamp_(0, 1)
        mean = torch.tensor(self.data_config['mean'], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.data_config['std'], device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def forward_normalized(self, x: torch.Tensor) -> List[FeatureLevel]:
        """The pyramid of an already preprocessed (B, 3, H, W) batch."""
        outs = self.model(x.to(self.device))
        return [FeatureLevel(level=i, stride=s, channels=c, tensor=t)
                for i, s, c, t in zip(self.model.out_indices, self.strides, self.channels, outs)]

    def __call__(self, image) -> List[FeatureLevel]:
        """The pyramid of an image (path, PIL image, array or tensor, see :meth:`to_tensor`)."""
        return self.forward_normalized(self.preprocess(image))


def extract_features(name: str, image, arch=None, checkpoint=None, short_side: Union[None, int, str] = None,
                     max_size: Optional[int] = None, device: Union[str, torch.device] = 'cpu',
                     **model_kwargs) -> List[FeatureLevel]:
    """Build backbone ``name`` (variant ``arch``), load ``checkpoint`` if given, and return the pyramid of
    ``image`` (a file path, PIL image, HWC uint8 array or image tensor) as a list of :class:`FeatureLevel`
    (level, stride, channels, (B, C, H, W) tensor). See the module doc for the preprocessing."""
    return FeatureExtractor(name, arch, checkpoint, short_side, max_size, device, **model_kwargs)(image)


def pyramid_to_dict(levels: Sequence[FeatureLevel], index: int = 0) -> Dict[str, object]:
    """Sample ``index`` of a batch pyramid as a plain dict (what ``tools/extract_features.py`` saves):
    ``levels`` (list of (C, H, W) float tensors), ``strides``, ``channels``, ``level_indices``."""
    return dict(levels=[lv.tensor[index].detach().cpu().contiguous() for lv in levels],
                strides=[int(lv.stride) for lv in levels], channels=[int(lv.channels) for lv in levels],
                level_indices=[int(lv.level) for lv in levels])


def pca_rgb(fmap: torch.Tensor, q: int = 3) -> torch.Tensor:
    """First three principal components of a (C, H, W) map as an RGB image (3, H, W) in [0, 1]: each
    component is stretched between its 1st and 99th percentile over the map."""
    c, h, w = fmap.shape
    x = fmap.float().reshape(c, h * w).T  # (N, C)
    x = x - x.mean(0, keepdim=True)
    k = min(q, c, x.shape[0])
    if k > 0 and x.abs().max() > 0:
        # principal axes = top eigenvectors of the C x C covariance (exact, deterministic, cheap for large maps)
        _, vecs = torch.linalg.eigh(x.double().T @ x.double())
        comp = (x.double() @ vecs[:, -k:].flip(1)).float()
    else:
        comp = x.new_zeros(h * w, 0)
    if comp.shape[1] < 3:
        comp = torch.cat([comp, comp.new_zeros(h * w, 3 - comp.shape[1])], 1)
    lo = torch.quantile(comp, 0.01, dim=0, keepdim=True)
    hi = torch.quantile(comp, 0.99, dim=0, keepdim=True)
    comp = ((comp - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return comp.T.reshape(3, h, w)
