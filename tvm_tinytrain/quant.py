"""The one canonical int8 requantization of tvm-tinytrain.

Every real-valued rescale ``M`` (for a conv: ``x_scale * w_scale[o] / y_scale``)
is replaced at import time by a fixed-point pair ``(mult, shift)`` with
``M ~= mult * 2**-shift``, ``mult`` a Q31 integer in ``[2**30, 2**31)`` and
``1 <= shift <= 62``.  The numpy reference, the TIR kernels and the generated C
all apply exactly this integer recipe, so they agree bit for bit:

    total = saturate_int32(acc + bias)            # no int32 wrap-around
    y     = (int64(total) * mult + 2**(shift-1)) >> shift   # round half up
    y     = clamp(y + y_zero, qmin, qmax)

The saturating bias add is what keeps the paper's dead channels (bias =
-2**31) from wrapping; ``|total * mult| < 2**62`` so the int64 product and the
rounding constant never overflow.  Rescales below ``2**-32`` cannot move any
int32 total by half a step, so they become ``mult = 0``.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import TinyTrainError

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_RESCALE = 2.0**30
MIN_RESCALE = 2.0**-32


def quantize_multiplier(rescale: float, what: str = "rescale") -> tuple[int, int]:
    """Return ``(mult, shift)`` with ``rescale ~= mult * 2**-shift``.

    ``what`` names the tensor or node in the error raised for a rescale that
    cannot be represented (negative, NaN, or >= 2**30).
    """
    m = float(rescale)
    if not math.isfinite(m) or m < 0.0:
        raise TinyTrainError(f"{what}: rescale factor {rescale!r} must be finite and >= 0")
    if m >= MAX_RESCALE:
        raise TinyTrainError(f"{what}: rescale factor {m:g} is too large (must be < 2**30)")
    if m < MIN_RESCALE:
        return 0, 1
    frac, exp = math.frexp(m)  # m = frac * 2**exp, frac in [0.5, 1)
    mult = int(round(frac * (1 << 31)))
    if mult == 1 << 31:
        mult >>= 1
        exp += 1
    return mult, 31 - exp


def quantize_multipliers(rescales, what: str = "rescale") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel :func:`quantize_multiplier`; returns int32 ``mult`` and ``shift`` arrays."""
    pairs = [quantize_multiplier(m, f"{what}[{i}]") for i, m in enumerate(np.asarray(rescales, np.float64).ravel())]
    mult = np.array([p[0] for p in pairs], dtype=np.int64).astype(np.int32)
    shift = np.array([p[1] for p in pairs], dtype=np.int32)
    return mult, shift


def add_multipliers(a_scale: float, b_scale: float, y_scale: float, what: str = "add") -> tuple[int, int, int]:
    """Fixed-point ``(mult_a, mult_b, shift)`` for ``y = (a*sa + b*sb) / sy``.

    Both inputs share one shift, chosen so that the larger rescale is a Q31
    multiplier; ``|(a-za)*mult_a + (b-zb)*mult_b| < 2**41`` so int64 is ample.
    """
    ma, mb = a_scale / y_scale, b_scale / y_scale
    big = max(ma, mb)
    _, shift = quantize_multiplier(big, what)
    if big < MIN_RESCALE:
        return 0, 0, 1
    mult_a = int(round(ma * 2.0**shift))
    mult_b = int(round(mb * 2.0**shift))
    return mult_a, mult_b, shift


def activation_range(zero_point: int, scale: float, activation: str | None) -> tuple[int, int]:
    """int8 clamp bounds that fold a ReLU / ReLU6 into the output range."""
    lo, hi = INT8_MIN, INT8_MAX
    if activation in ("relu", "relu6"):
        lo = max(lo, int(zero_point))
    if activation == "relu6":
        hi = min(hi, int(zero_point) + int(round(6.0 / scale)))
    elif activation not in (None, "relu"):
        raise TinyTrainError(f"unknown activation {activation!r}")
    return lo, hi
