"""Relax gradients that TVM 0.27's ``relax.transform.Gradient`` lacks and the float mode needs.

The float32 mode keeps each node's folded ReLU/ReLU6 as ``R.clip`` to the
real-valued range of its int8 clamp, because that is literally what the int8
kernel computes (one op, bounds read straight off ``qmin``/``qmax``).  TVM has
no ``FPrimalGradient`` for ``relax.clip``; this module registers one: the
incoming gradient masked by "strictly inside the range" (zero on saturated
outputs, the 0/1 mask of the paper's section 2, and PyTorch's ``hardtanh``
convention at the boundary).  Global average pooling is written as
``R.mean``, which already has a gradient, so no adaptive-pool gradient is
registered.

Importing the module registers the gradient once; registering again (a
reload, or another plugin that got there first) is skipped.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.op import greater_equal, less_equal, logical_or, where
from tvm.relax.op.base import register_gradient
from tvm.relax.op.grad import no_grad

CLIP = "relax.clip"


def _bound(arg) -> float:
    """The constant min/max of a ``clip`` call (a PrimValue or an immediate)."""
    value = getattr(arg, "value", arg)
    return float(getattr(value, "value", value))


def clip_grad(orig_var, orig_call, output_grad, ctx) -> list:
    """``x_grad = where(x <= lo or x >= hi, 0, y_grad)``; the bounds are constants (``no_grad``)."""
    x, lo, hi = orig_call.args
    dtype = x.ty.dtype
    saturated = logical_or(less_equal(x, relax.const(_bound(lo), dtype)), greater_equal(x, relax.const(_bound(hi), dtype)))
    return [where(saturated, relax.const(0, dtype), output_grad), no_grad(lo), no_grad(hi)]


def register() -> None:
    """Register :func:`clip_grad` unless ``relax.clip`` already has a gradient."""
    if tvm.ir.Op.get(CLIP).get_attr("FPrimalGradient") is None:
        register_gradient(CLIP, clip_grad)


register()
