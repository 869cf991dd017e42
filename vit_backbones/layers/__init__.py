"""The shared layers every backbone is built from."""
from .attention_kernel import attention_scores, explicit_attention, scaled_dot_product, split_heads
from .attention import Attention, AttentionBase, WindowAttention
from .drop import DropPath, drop_path, drop_path_schedule, make_drop_path
from .format import nchw_to_nhwc, nchw_to_nlc, nhwc_to_nchw, nlc_to_nchw, token_map
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import ConvStem, PatchEmbed, pad_to_multiple  # noqa: F401
from .pos_embed import resample_abs_pos_embed
from .pyramid import FeaturePyramid, LayerNorm2d, ceil_max_pool2d, make_norm2d  # noqa: F401
from .vit_block import ViTBlock  # noqa: F401
from .sra import SpatialReductionAttention  # noqa: F401
from .rel_pos import RelativePositionBias, relative_position_index, resize_rel_pos_table, window_from_table_len
from .window import (WindowPlan, pad_to_window, shifted_window_mask, tokens_to_windows, window_partition, window_plan,
                     window_reverse, windows_to_tokens)

__all__ = [
    'Attention', 'AttentionBase', 'attention_scores', 'explicit_attention', 'scaled_dot_product', 'split_heads', 'DropPath', 'drop_path', 'drop_path_schedule', 'make_drop_path',
    'nchw_to_nhwc', 'nchw_to_nlc', 'nhwc_to_nchw', 'nlc_to_nchw', 'token_map', 'LayerScale', 'Mlp', 'ConvStem', 'PatchEmbed',
    'resample_abs_pos_embed', 'RelativePositionBias', 'relative_position_index', 'resize_rel_pos_table',
    'window_from_table_len', 'pad_to_window', 'shifted_window_mask', 'window_partition', 'window_reverse',
    'WindowPlan', 'window_plan', 'tokens_to_windows', 'windows_to_tokens'
]
__all__ += ['FeaturePyramid', 'LayerNorm2d', 'make_norm2d', 'ViTBlock']
from .peg import PositionalEncodingGenerator  # noqa: E402,F401
from .leff import LocallyEnhancedFeedForward  # noqa: E402,F401
__all__ += ['PositionalEncodingGenerator', 'LocallyEnhancedFeedForward']
from .head_mixing import ReAttention, TalkingHeadAttention, mix_heads  # noqa: E402,F401
__all__ += ['ReAttention', 'TalkingHeadAttention', 'mix_heads']
from .window_attention import window_attention  # noqa: E402,F401
__all__ += ['WindowAttention', 'window_attention']
from .attention_bias import gather_offset_bias, offset_bias_index, resize_offset_bias_table  # noqa: E402,F401
