"""Layers streamed row by row (StreamInputRows): the stages of a pipeline and the rows each keeps.

A pipeline is a run of consecutive ``*_rows`` bindings.  Its first stage reads
the image through a row reader; every other stage reads earlier stages'
outputs, of which only the last stage's leaves the pipeline (it is written
whole, the others never exist whole).  Each intermediate output lives in a
*ring* of ``ring_rows`` rows: row ``r`` is slot ``r % ring_rows``, a slot being
all channels of one row (``[channels][width]``, the layout of a band kernel's
``(1, C, 1, W)`` output, so a stage writes its row straight into its slot and
a 1-row window is a slot).  A k-row window is gathered into the pipeline's
``window`` buffer, one for all stages since one stage runs at a time; a
depthwise conv's, whose output channels each read one input channel, a few
channels at a time (:func:`channel_group`, option ``row_window_bytes``), its
band kernel called once per group: the window of a wide expanded layer
(e.g. 9 KB for 48 channels x 3 rows x 64 in MbV2's block 1) is then no larger
than the first conv's.

An expansion that RecomputeStreamedExpansion marked ``recomputed_rows`` has
no ring and makes no rows of its own: its depthwise reader's window reads the
expansion's *input* rows (``RowInput.via`` names the expansion), and for each
channel group the C step function makes that group's expanded rows from them
into the pipeline's ``expanded`` buffer, then gathers the window from it.

The schedule makes one row at a time, always of the last stage that can make
its next row (its inputs' rows are there) and still has rows to make: a row is
consumed as soon as it can be, so each ring holds little more than its
readers' windows (3 rows for a 3x3 depthwise conv's input).  The C step
function (``tvm_tinytrain/codegen/step.py``) runs this loop;
:func:`_ring_rows` replays it here to find how many rows each ring must hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvm import relax

from tvm_tinytrain.errors import TinyTrainError

from ._ir import KernelCall, decode, shape_of
from .config import option

ROW_OPS = ("conv2d_requant_rows", "add_int8_rows")
IMAGE = -1


@dataclass(frozen=True)
class RowInput:
    """One tensor argument of a stage: which stage makes it (or :data:`IMAGE`) and the window of rows it reads."""

    source: int
    rows: int  # window height: the conv's kernel size, 1 for an add
    stride: int
    pad: int
    zero: int  # the value of window rows past the tensor's edges (the conv's input zero point)
    via: int | None = None  # a recomputed expansion between ``source`` and the reader (its rows are made for each window)

    def first_row(self, out_row: int) -> int:
        return out_row * self.stride - self.pad

    def rows_for(self, made: int, height: int) -> int:
        """Rows of the source a consumer that must have made ``made`` rows needs (0 when ``made`` is 0)."""
        return min(height, self.first_row(made - 1) + self.rows) if made > 0 else 0


@dataclass
class RowStage:
    binding: int
    call: KernelCall
    inputs: list[RowInput]  # the call's first len(inputs) arguments
    shape: tuple[int, int, int]  # (channels, height, width) of its output
    group: int  # channels its band kernel takes at a time (a depthwise conv's window is gathered group by group)
    ring_rows: int = 0  # 0: the last stage, whose output is written whole
    recomputed: bool = False  # a 1x1 expansion its depthwise reader recomputes per channel group: it keeps no ring

    @property
    def row_bytes(self) -> int:
        return self.shape[0] * self.shape[2]

    @property
    def grouped(self) -> bool:
        """A depthwise conv whose band kernel runs once per channel group (input channel = output channel)."""
        return self.group < self.shape[0]

    def window_bytes(self) -> int:
        """Bytes of its gathered window: a stage reading the image, or a window of more than one row."""
        inp = self.inputs[0]
        if inp.source != IMAGE and inp.rows == 1:
            return 0
        _, c, _, w = shape_of(self.call.args[0])
        return (self.group if self.grouped else c) * inp.rows * w


def channel_group(call, window_bytes: int) -> int:
    """Channels a streamed layer's band kernel takes at a time: for a depthwise conv on a window of more than one row,
    the most that divide its channels and whose window fits ``window_bytes`` (at least one), as each output channel
    reads its own input channel only; every channel for the other layers.  Recorded as the streamed call's attribute
    ``channel_group``."""
    if "channel_group" in call.attrs:
        return int(call.attrs["channel_group"])
    c = shape_of(call.var)[1]
    if not call.op.startswith("conv2d_requant") or call.attrs["groups"] <= 1:
        return c
    _, _, k, _ = shape_of(call.args[1])
    row = k * shape_of(call.args[0])[3]
    return max((g for g in range(1, c + 1) if c % g == 0 and g * row <= window_bytes), default=1) if k > 1 else c


@dataclass
class RowPipeline:
    stages: list[RowStage]
    consumers: list[list[tuple[int, RowInput]]] = field(default_factory=list)

    @property
    def first(self) -> int:
        return self.stages[0].binding

    @property
    def last(self) -> int:
        return self.stages[-1].binding

    @property
    def window_bytes(self) -> int:
        """One window serves every stage: it is filled just before the stage's band kernel reads it."""
        return max(s.window_bytes() for s in self.stages)

    @property
    def expanded_bytes(self) -> int:
        """The rows a recomputed expansion makes for one window of its reader's channel group (``[rows][group][width]``,
        a ring of as many slots as the window has rows, from which the window is gathered); one for all stages."""
        return max((inp.rows * s.group * self.stages[inp.via].shape[2] for s in self.stages for inp in s.inputs if inp.via is not None),
                   default=0)

    def buffers(self, stage: RowStage) -> list[tuple[str, int]]:
        """A stage's buffers besides its output, in the order the planner and the C step function take them: the
        pipeline's window and expanded rows (with the first stage), then its ring (or, for the last stage, the band its
        row is computed into before it is stored in the output; a recomputed expansion has none)."""
        parts = [(part, size) for part, size in (("window", self.window_bytes), ("expanded", self.expanded_bytes))
                 if stage is self.stages[0] and size]
        if stage.recomputed:
            return parts
        return parts + ([("band", stage.row_bytes)] if stage is self.stages[-1] else [("ring", stage.ring_rows * stage.row_bytes)])

    def bytes(self) -> int:
        """Arena bytes while it runs: its buffers and the last stage's output."""
        last = self.stages[-1]
        return sum(size for s in self.stages for _, size in self.buffers(s)) + last.row_bytes * last.shape[1]

    def total_rows(self, j: int) -> int:
        """Rows stage ``j`` makes: all of them for the last stage, else as many as its consumers read."""
        height = self.stages[j].shape[1]
        if j == len(self.stages) - 1:
            return height
        if self.stages[j].recomputed:
            return 0
        return max(inp.rows_for(self.stages[c].shape[1], height) for c, inp in self.consumers[j])

    def ready(self, j: int, made: list[int]) -> bool:
        """Whether every row stage ``j``'s next row reads has been made."""
        return all(inp.source == IMAGE or inp.rows_for(made[j] + 1, self.stages[inp.source].shape[1]) <= made[inp.source]
                   for inp in self.stages[j].inputs)

    def schedule(self):
        """The stages in the order they make their rows: each time, the last stage that still has rows to make and
        can make its next one, so every row is consumed as early as possible and the rings stay small."""
        made = [0] * len(self.stages)
        totals = [self.total_rows(j) for j in range(len(self.stages))]
        while made[-1] < totals[-1]:
            j = next((j for j in range(len(self.stages) - 1, -1, -1) if made[j] < totals[j] and self.ready(j, made)), None)
            if j is None:
                raise TinyTrainError(f"StreamInputRows: the streamed layers from binding {self.first} stall: no layer can make its next row")
            made[j] += 1
            yield j, made


def _stage(call, index: int, position: dict[relax.Var, int], image, stages: list[RowStage]) -> RowStage:
    what = f"StreamInputRows: binding {index} ({call.var.name} = {call.op} of {call.node})"
    if call.op.startswith("conv2d_requant"):
        k = shape_of(call.args[1])[2]
        tensors = [(call.args[0], k, call.attrs["stride"], (k - 1) // 2, call.attrs["x_zero"])]
    else:
        tensors = [(a, 1, 1, 0, 0) for a in call.args[:2]]
    inputs = []
    for arg, rows, stride, pad, zero in tensors:
        if image is not None and arg.same_as(image) and not position and call.op.startswith("conv2d_requant"):
            source = IMAGE
        elif arg in position:
            source = position[arg]
        else:
            raise TinyTrainError(f"{what} reads {arg.name}, which is neither the image (for the first layer) nor an earlier streamed layer's output")
        via = source if source != IMAGE and stages[source].recomputed else None
        if via is not None:  # the window's rows are the expansion's, made from its source's rows, 1:1
            if rows == 1 or call.attrs["groups"] <= 1:
                raise TinyTrainError(f"{what} reads the recomputed expansion {arg.name}, which only a depthwise conv's window may read")
            source = stages[via].inputs[0].source
        inputs.append(RowInput(source, rows, stride, pad, zero, via))
    _, c, h, w = shape_of(call.var)
    stage = RowStage(index, call, inputs, (c, h, w), channel_group(call, int(option("row_window_bytes"))),
                     recomputed=bool(call.attrs.get("recomputed_rows", 0)))
    if stage.recomputed and not (call.op == "conv2d_requant_rows" and call.attrs["groups"] == 1 and call.attrs["stride"] == 1
                                 and shape_of(call.args[1])[2] == 1 and inputs[0].source != IMAGE):
        raise TinyTrainError(f"{what} is marked recomputed_rows, but only a 1x1 conv (stride 1) on a streamed layer's rows can be")
    return stage


def pipeline(calls: list[tuple[int, KernelCall]], image, escaping=frozenset()) -> RowPipeline:
    """The pipeline of ``calls`` (binding index, call), consecutive, the first reading ``image``; ``escaping``: the
    vars read after them (only the last call's may be)."""
    position: dict[relax.Var, int] = {}
    stages = []
    for index, call in calls:
        stages.append(_stage(call, index, position, image, stages))
        position[call.var] = len(stages) - 1
    pipe = RowPipeline(stages)
    pipe.consumers = [[] for _ in stages]
    for c, stage in enumerate(stages):
        for inp in stage.inputs:
            if inp.source != IMAGE and not stage.recomputed:  # a recomputed expansion's rows are read through its reader's window
                pipe.consumers[inp.source].append((c, inp))
    for j, stage in enumerate(stages[:-1]):
        if stage.recomputed:
            readers = [s for s in stages if any(inp.via == j for inp in s.inputs)]
            if stage.call.var in escaping or len(readers) != 1 or any(s.group != stage.group for s in readers):
                raise TinyTrainError(f"StreamInputRows: binding {stage.binding} ({stage.call.var.name} of {stage.call.node}) is recomputed "
                                     "by its reader, but it is not read by exactly one depthwise conv of its channel group")
            continue
        if stage.call.var in escaping or not pipe.consumers[j]:
            raise TinyTrainError(f"StreamInputRows: binding {stage.binding} ({stage.call.var.name} of {stage.call.node}) is streamed, "
                                 "but its output is read outside its pipeline (only the last layer's may be)")
    for stage, rows in zip(stages[:-1], _ring_rows(pipe)):
        stage.ring_rows = rows
    return pipe


def row_pipelines(mod, func: relax.Function) -> list[RowPipeline]:
    """The pipelines of ``func``, their rings sized; an error names a binding that breaks the structure."""
    bindings = list(func.body.blocks[0].bindings)
    calls = [decode(mod, b) for b in bindings]
    image = func.params[0] if func.params else None
    pipelines, i = [], 0
    while i < len(bindings):
        if calls[i] is None or calls[i].op not in ROW_OPS:
            i += 1
            continue
        first = i
        while i < len(bindings) and calls[i] is not None and calls[i].op in ROW_OPS:
            i += 1
        inside = {b.var for b in bindings[first:i]}
        outside = [b.value for k, b in enumerate(bindings) if not first <= k < i] + [func.body.body]
        escaping = {v for expr in outside for v in relax.analysis.free_vars(expr) if v in inside}
        pipelines.append(pipeline([(k, calls[k]) for k in range(first, i)], image, escaping))
    return pipelines


def _ring_rows(pipe: RowPipeline) -> list[int]:
    """Replay the schedule: after a stage makes a row, it must still hold every row from the first one a consumer's
    next window reads."""
    ring = [1] * len(pipe.stages)
    for j, made in pipe.schedule():
        if j < len(pipe.stages) - 1:
            oldest = min(max(0, inp.first_row(made[c])) for c, inp in pipe.consumers[j])
            ring[j] = max(ring[j], made[j] - oldest)
    return ring
