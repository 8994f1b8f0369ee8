"""The one TIR schedule every kernel gets: keep intermediate stages small.

TE builds a kernel as stages that each write a whole intermediate tensor.
On a microcontroller those tensors are RAM, so before lowering we move each
stage next to its use: element-wise producers are inlined into their
consumers, and the element-wise epilogue of a reduction (requantize after a
conv sum, the QAS scale after a weight-gradient sum) is computed inside the
reduction's output loop, where TVM's buffer compaction shrinks the
accumulator to a scalar.  The arithmetic and its order are unchanged, so the
results stay bit-identical.
"""

from __future__ import annotations

import tvm
from tvm import s_tir

SPATIAL = 0  # IterVar type of a data-parallel axis


def compact_schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint in outputs:
            continue
        iters = sch.get(block).iter_vars
        n_spatial = sum(1 for iv in iters if iv.iter_type == SPATIAL)
        try:
            if n_spatial == len(iters):
                sch.compute_inline(block)
            elif n_spatial and len(consumers := sch.get_consumers(block)) == 1:
                sch.reverse_compute_at(consumers[0], sch.get_loops(block)[n_spatial - 1])
        except s_tir.ScheduleError:
            continue  # the stage stays whole: correct, only bigger
    return sch.mod["main"]
