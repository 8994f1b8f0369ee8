"""RecomputeStreamedExpansion: a streamed 1x1 expansion keeps no ring; its depthwise reader makes its rows per window.

In a pipeline of streamed layers (StreamInputRows, ``_row_pipeline.py``) the
largest rings are those of the expanded layers that feed a depthwise conv with
a large kernel: Proxyless' block 3 keeps 7 rows x 48 channels x 32 of its
expansion (10.5 KB) for its 7x7 depthwise conv, three times the ring of the
16-channel rows the expansion reads.  The depthwise conv already gathers its
window a channel group at a time, and a 1x1 conv's output channels are
independent; so for each output row and each group the expansion's rows of
that group can be made from the narrow rows when the window needs them.  The
narrow layer's ring then holds the window's rows instead, and the expanded rows
of one group go to a buffer of ``k x group x width`` (``expanded``, one per
pipeline) from which the window is gathered.

Each expanded row is then made ``k / stride`` times (more instructions, no
other cost), so by default (option ``recompute_streamed_expansion="at-peak"``)
an expansion is recomputed only in the function whose peak of live bytes (as
PlanMemory's lower bound counts them, after every other fusion) is the
module's highest, since ``train_step`` and ``infer`` share the C arena, and
only when that lowers its peak by at least ``recompute_min_saving`` bytes
(1 KB): the pipeline must be the peak, and not by a hair.  The widest ring is
tried first, and the highest function again after each one recomputed.
``"always"`` recomputes every eligible expansion, ``"never"`` none.  Run it
after the other fusions, before PlanMemory.

The Relax VM runs the same PrimFuncs, so the same bits: the pass only marks
the expansion's call, re-emitted with attribute ``recomputed_rows``, a
``channel_group`` (the reader's, or in the optimized variant an even one that
runs the expansion's group on the DSP GEMM, the reader re-emitted with it too)
and a band kernel of one group of output channels, which ``_row_pipeline.py``
and the C step function (``codegen/step.py``) follow.

Before (a ring of 7 rows of ``lv20``)::

    lv20 = R.call_tir(cls.conv2d_requant_rows10, (lv19, w, b, c0, c1), R.Tensor((1, 48, 32, 32), "int8"))
    lv21 = R.call_tir(cls.conv2d_requant_rows11, (lv20, w_dw, ...), R.Tensor((1, 48, 16, 16), "int8"))  # 7x7, groups of 4

After: the same bindings; ``conv2d_requant_rows10`` now carries ``tinytrain.recomputed_rows = 1``,
``tinytrain.channel_group = 4`` and the band kernel ``(1, 16, 1, 32) -> (1, 4, 1, 32)``.
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_tinytrain.ops import tir_conv_gemm
from tvm_tinytrain.ops.schedule import current_variant

from ._fusion import reemit
from ._ir import decode, shape_of
from ._row_pipeline import IMAGE, RowPipeline, RowStage, row_pipelines
from .config import option, policy_targets
from .plan_memory import function_live_floor
from .stream_input_rows import ROW_KERNEL, band_kernel


def candidates(pipe: RowPipeline) -> list[tuple[int, int]]:
    """(expansion, reader) stages of each expansion that can be recomputed: a 1x1 conv (stride 1) on a streamed
    layer's rows, read only by one depthwise conv's window of more than one row."""
    found = []
    for j, stage in enumerate(pipe.stages[:-1]):
        a = stage.call.attrs
        if (stage.recomputed or stage.call.op != "conv2d_requant_rows" or a["groups"] != 1 or a["stride"] != 1
                or shape_of(stage.call.args[1])[2] != 1 or stage.inputs[0].source == IMAGE or len(pipe.consumers[j]) != 1):
            continue
        reader, window = pipe.consumers[j][0]
        if pipe.stages[reader].call.attrs.get("groups", 1) > 1 and window.rows > 1 and window.via is None:
            found.append((j, reader))
    return found


def channel_group(expansion: RowStage, reader: RowStage, window_bytes: int) -> int:
    """Channels per group for a recomputed expansion and its reader: the reader's, unless another divisor of the
    channels whose window also fits ``window_bytes`` lets the optimized variant run the expansion's group on its DSP
    GEMM (an even count), the largest such."""
    c, _, width = expansion.shape
    rows = reader.inputs[0].rows
    if current_variant() != "optimized":
        return reader.group
    fast = [g for g in range(2, c + 1) if c % g == 0 and g * rows * width <= window_bytes
            and tir_conv_gemm.fits(shape_of(expansion.call.args[0])[1], g, 1, width)]
    return max(fast, default=reader.group)


def _widest_first(mod: tvm.IRModule, name: str) -> list[tuple[RowStage, RowStage]]:
    """The (expansion, reader) candidates of function ``name``, the widest ring first."""
    found = [(pipe.stages[e], pipe.stages[r]) for pipe in row_pipelines(mod, mod[name]) for e, r in candidates(pipe)]
    return sorted(found, key=lambda pair: -pair[0].ring_rows * pair[0].row_bytes)


def _recompute(mod: tvm.IRModule, name: str, expansion: relax.Var, reader: relax.Var, group: int) -> tvm.IRModule:
    """``mod`` with the streamed ``expansion`` in function ``name`` marked recomputed, it and its depthwise ``reader``
    in channel groups of ``group``."""
    def emit(bb, binding) -> bool:
        if not (binding.var.same_as(expansion) or binding.var.same_as(reader)):
            return False
        call = decode(mod, binding)
        prim = mod[call.gvar].with_attr("tinytrain.channel_group", group)
        if binding.var.same_as(expansion):
            prim = prim.with_attr("tinytrain.recomputed_rows", 1)
        gv = bb.add_func(prim.with_attr(ROW_KERNEL, band_kernel(call, group)), call.op)
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.call_tir(gv, binding.value.args[1], binding.var.ty))))
        return True

    return reemit(mod, name, emit)


@tvm.transform.module_pass(opt_level=0, name="RecomputeStreamedExpansion")
class RecomputeStreamedExpansion:
    """Mark streamed 1x1 expansions to be recomputed by their depthwise readers, per options
    ``recompute_streamed_expansion`` ("at-peak", "always", "never") and ``recompute_min_saving`` (bytes of peak an
    "at-peak" recomputation must save); run after the fusions, before PlanMemory."""

    def __init__(self, policy: str | None = None, min_saving: int | None = None):
        self.policy, self.min_saving = policy, min_saving

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        policy, names = policy_targets(mod, "RecomputeStreamedExpansion", "recompute_streamed_expansion", self.policy)
        if not names:
            return mod
        min_saving = int(option("recompute_min_saving", self.min_saving))
        window_bytes = int(option("row_window_bytes"))
        if policy == "always":
            for name in names:
                while found := _widest_first(mod, name):
                    e, r = found[0]
                    mod = _recompute(mod, name, e.call.var, r.call.var, channel_group(e, r, window_bytes))
            return mod
        while True:  # the C step functions share one arena: lower the function that peaks highest, while that saves enough
            peaks = {name: function_live_floor(mod, name) for name in names}
            name = max(names, key=peaks.__getitem__)
            for e, r in _widest_first(mod, name):
                trial = _recompute(mod, name, e.call.var, r.call.var, channel_group(e, r, window_bytes))
                if peaks[name] - function_live_floor(trial, name) >= min_saving:
                    mod = trial
                    break
            else:
                return mod
