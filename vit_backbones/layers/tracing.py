"""Which code path the layers take when the forward is traced instead of run.

Three ways a forward can be recorded, and what the layers do under each:

* **torch.compile, torch.export, torch.onnx.export(dynamo=True)** (:func:`symbolic_tracing`): sizes may
  be symbolic. Window plans, shift masks, padding, crops, position-embedding resampling and attention-bias
  indices are then computed with tensor operations on the sizes, without Python branches on their values,
  without caches keyed on them and without the hand-written training autograd Functions, so one graph is
  correct at every input size (and differentiable through ordinary autograd).
* **torch.jit.trace and the TorchScript-based torch.onnx.export(dynamo=False)**: the tracer records
  Python-level decisions on sizes (how much to pad, which window holds which token, whether a table is
  cropped or resampled) as constants, so the traced graph would be silently wrong at other input sizes.
  Where a layer makes such a decision it raises :class:`StaticTraceError` pointing at the dynamic
  exporters instead. Inside :func:`fixed_size_trace` it traces anyway (for deployments that only ever
  run the traced size, e.g. a static-shape mmdeploy config); the graph is then valid for that size only.
* **eager** (everything else): the fast path, with caches keyed on concrete sizes.
"""
import contextlib

import torch

_FIXED_SIZE_TRACE = False


class StaticTraceError(RuntimeError):
    """A size-dependent decision was about to be baked into a torch.jit / TorchScript-ONNX trace."""


def symbolic_tracing() -> bool:
    """True while torch.compile, torch.export or the ONNX dynamo exporter records the forward."""
    return torch.compiler.is_compiling()


def tracing() -> bool:
    """True under any tracer (symbolic ones and torch.jit / TorchScript-based ONNX export): the layers
    then avoid the eager-only fast paths (size-keyed caches, training autograd Functions)."""
    # the ONNX exporters trace through one of the two (dynamo=True: torch.export; dynamo=False: torch.jit)
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@contextlib.contextmanager
def fixed_size_trace():
    """Allow torch.jit.trace / torch.onnx.export(dynamo=False) for a model that will only ever run at the
    traced input size (the sizes then become constants of the graph)."""
    global _FIXED_SIZE_TRACE
    old, _FIXED_SIZE_TRACE = _FIXED_SIZE_TRACE, True
    try:
        yield
    finally:
        _FIXED_SIZE_TRACE = old


def refuse_static_trace(what: str):
    """Raise :class:`StaticTraceError` under torch.jit tracing (outside :func:`fixed_size_trace`):
    ``what`` names the size-dependent decision the tracer would freeze."""
    if torch.jit.is_tracing() and not _FIXED_SIZE_TRACE:
        raise StaticTraceError(
            f'torch.jit.trace / torch.onnx.export(dynamo=False) would record {what} for the traced input size '
            'as constants, and the traced graph would be silently wrong at any other size. Export with '
            'torch.export.export(model, (x,), dynamic_shapes=...) or torch.onnx.export(model, (x,), path, '
            'dynamo=True, dynamic_shapes=...) instead (python tools/export.py does both). To trace for one fixed '
            'input size only, trace inside `with vit_backbones.layers.fixed_size_trace():`.')


def ceil_div(a, b: int):
    """``ceil(a / b)`` for a non-negative size ``a`` (int or symbolic) as ``(a + b - 1) // b``: the form
    ``-(-a // b)`` floor-divides a negative number, which ONNX exports as a truncating division."""
    return (a + b - 1) // b


def pad_amount(a, b: int):
    """How much to add to a size ``a`` to reach a multiple of ``b`` (``(-a) % b`` without a negative operand)."""
    return ceil_div(a, b) * b - a


def export_shapes():
    """Context for a backbone's forward: under non-strict torch.export (also what
    torch.onnx.export(dynamo=True) runs) it turns on ``backed_size_oblivious`` for the forward, so maps
    that can be a single cell (the stride-32 level of a 32-pixel input, the last Swin stage's one window up
    to 224 px) do not specialise the graph to sizes > 1 ("0/1 specialisation"): one exported graph then
    covers every input size. Elsewhere (eager, torch.compile, strict export traced by dynamo) it does
    nothing."""
    if torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling():
        import torch.fx.experimental._config as shape_config
        return shape_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def dense_map(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself in eager mode; a contiguous copy under symbolic tracing. A map that is a strided view
    of a token sequence (prefix tokens sliced off) makes the convolution's layout choice guard on the batch
    size (batch > 1), which torch.export would turn into a runtime check; a dense one does not."""
    return x.contiguous() if symbolic_tracing() else x


def is_symbolic(*sizes) -> bool:
    """Whether any of ``sizes`` is a symbolic (traced) integer rather than a Python int."""
    return any(isinstance(s, torch.SymInt) for s in sizes)
