"""Options of tinytrain's passes, set for a whole pipeline.

TVM 0.27 only accepts ``PassContext(config=...)`` keys registered from C++
(``TVM_REGISTER_PASS_CONFIG_OPTION``), which a pure-Python plugin cannot do.
So the passes read their defaults from this context instead, used beside
TVM's own::

    with tvm.transform.PassContext(opt_level=3), pass_config(qas=False, num_classes=10):
        mod = tvm.transform.Sequential([AppendLoss(), QuantizedGradient()])(mod)

An argument given to a pass's constructor wins over the context.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from tvm_tinytrain.errors import TinyTrainError

DEFAULTS = {
    "num_classes": 10,  # AppendLoss: classes of the new float32 head
    "head_seed": 0,  # AppendLoss: seed of the new head's initial weights
    "qas": True,  # QuantizedGradient: quantization-aware scaling of int8 weight/bias gradients
    "scheme": "full",  # SparseUpdate: scheme spelling (tvm_tinytrain.scheme.parse_scheme)
    "reorder": True,  # ReorderUpdates: False keeps every update after the whole backward
    "alignment": 16,  # PlanMemory: byte alignment of arena offsets
    "kernel_local_bytes": 1024,  # PlanMemory and C codegen: a kernel's internal buffers this small are C locals, not arena
    "placement_search": 2000,  # PlanMemory: most swaps of the local search over placement orders (0: greedy orders only)
    "fuse_trained_expansion": True,  # FuseDepthwiseBackward: also a trained expansion's weight update (less memory)
    "recompute_masks": True,  # FuseDepthwiseBackward: ... and its block's clamp masks recomputed, not stored (less memory)
    "fuse_bias_updates": True,  # FuseDepthwiseBackward: ... and its biases' SGD steps applied in place (no bias gradients)
    "masked_reads": True,  # FuseDepthwiseBackward: a residual's projection gradient read through its clamp mask, not copied
    "min_fused_plane": 65,  # FuseExpandDepthwise: smaller expanded planes (8x8 and below) stay a GEMM + depthwise conv (faster)
    "stream_input": True,  # StreamInputRows: the first conv reads the image in bands of rows (the image leaves the arena)
    "stream_layers": True,  # StreamInputRows: ... and the frozen layers after it run row by row too (their outputs leave it)
    "recompute_streamed_expansion": "at-peak",  # RecomputeStreamedExpansion: at-peak | always | never (see its module doc)
    "checkpoint_masks": "at-peak",  # CheckpointMasks: at-peak | always | never (see its module doc)
    "residual_backward_in_place": "at-peak",  # ResidualBackwardInPlace: at-peak | always | never (see its module doc)
    "narrow_peak_tiles": True,  # NarrowPeakTiles: the fused block backward at the step's peak builds fewer planes at a time
    "recompute_min_saving": 1024,  # RecomputeStreamedExpansion, CheckpointMasks, ResidualBackwardInPlace: bytes of peak an at-peak recomputation must save
    "row_window_bytes": 1024,  # StreamInputRows: a streamed depthwise conv gathers its window of rows in channel groups this small
    "max_plane_bytes": 5120,  # DepthwiseInPlace: largest operand channel plane staged in the kernel (64x64 + padding)
}

# The integer options' ranges (inclusive); every other integer option is at least 0.
RANGES = {
    "num_classes": (1, 65536),
    "alignment": (1, 4096),
    "recompute_min_saving": (1, None),  # 0 would take recomputations that save nothing, one after another
    "row_window_bytes": (1, None),
}

_local = threading.local()


def checked(name: str, value):
    """``value`` if it suits option ``name`` (the type of its default, the range of :data:`RANGES`), else an error
    naming the option: a string "False" must not read as true, nor a size of -1 reach a pass."""
    default = DEFAULTS[name]
    if isinstance(default, bool):
        if not isinstance(value, (bool, np.bool_)):
            raise TinyTrainError(f"pass option {name} = {value!r} must be True or False")
        return bool(value)
    if isinstance(default, int):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TinyTrainError(f"pass option {name} = {value!r} must be an integer")
        low, high = RANGES.get(name, (0, None))
        if value < low or (high is not None and value > high):
            raise TinyTrainError(f"pass option {name} = {value} must be in [{low}, {high if high is not None else 'inf'}]")
        if name == "alignment" and value & (value - 1):
            raise TinyTrainError(f"pass option alignment = {value} must be a power of two")
        return int(value)
    return value  # a policy (policy_option checks it) or a scheme (parse_scheme checks it)


def _stack() -> list[dict]:
    if not hasattr(_local, "stack"):
        _local.stack = [dict(DEFAULTS)]
    return _local.stack


@contextlib.contextmanager
def pass_config(**options):
    """Set pass options for the ``with`` body; unknown names are an error naming them."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TinyTrainError(f"unknown tinytrain pass option(s) {unknown}; known: {sorted(DEFAULTS)}")
    options = {name: checked(name, value) for name, value in options.items()}
    stack = _stack()
    stack.append({**stack[-1], **options})
    try:
        yield
    finally:
        stack.pop()


def option(name: str, given=None):
    """``given`` (a pass constructor's argument) when not None, else the innermost :func:`pass_config` value; checked."""
    return checked(name, given) if given is not None else _stack()[-1][name]


POLICIES = ("at-peak", "always", "never")  # of the passes that trade instructions for memory


def policy_option(pass_name: str, name: str, given=None) -> str:
    """:func:`option` ``name``, one of :data:`POLICIES`, else an error naming the pass and the option."""
    policy = option(name, given)
    if policy not in POLICIES:
        raise TinyTrainError(f"{pass_name}: option {name} is {policy!r}, not one of {POLICIES}")
    return policy


def policy_targets(mod, pass_name: str, name: str, given=None) -> tuple[str, list[str]]:
    """A policy pass's :func:`policy_option` and the Relax functions it rewrites: none under ``never``."""
    from ._fusion import relax_function_names  # here, not at the top: _fusion imports this module

    policy = policy_option(pass_name, name, given)
    return policy, [] if policy == "never" else relax_function_names(mod, pass_name)
