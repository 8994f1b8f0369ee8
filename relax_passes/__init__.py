"""tvm-tinytrain's Relax graph passes, each a standard ``tvm.transform.Pass``.

Composable with TVM's own passes in ``tvm.transform.Sequential``; options
come from the constructor or from :func:`pass_config` (see ``config.py`` for
why not ``PassContext(config=...)``)::

    seq = tvm.transform.Sequential([
        AppendLoss(num_classes=10), QuantizedGradient(qas=True),
        SparseUpdate("paper-99kb"), ReorderUpdates(), FuseConvRequant(), StreamInputRows(), FuseWeightUpdate(),
        FuseDepthwiseBackward(), FuseExpandDepthwise(), DepthwiseInPlace(), PointwiseInPlace(), ResidualBackwardInPlace(),
        NarrowPeakTiles(), CheckpointMasks(), ResidualBackwardInPlace(), NarrowPeakTiles(), RecomputeStreamedExpansion(),
        PlanMemory(),
    ])
    train_mod = seq(inference_mod)
"""

from .accumulate_gradients import AccumulateGradients
from .append_loss import AppendLoss
from .checkpoint_masks import CheckpointMasks
from .config import pass_config
from .depthwise_in_place import DepthwiseInPlace
from .fuse_conv_requant import FuseConvRequant
from .fuse_depthwise_backward import FuseDepthwiseBackward
from .fuse_expand_depthwise import FuseExpandDepthwise
from .fuse_weight_update import FuseWeightUpdate
from .narrow_peak_tiles import NarrowPeakTiles
from .plan_memory import MemoryPlan, PlanMemory, memory_plan
from .pointwise_in_place import PointwiseInPlace
from .quantized_gradient import QuantizedGradient
from .recompute_streamed_expansion import RecomputeStreamedExpansion
from .reorder_updates import ReorderUpdates
from .residual_backward_in_place import ResidualBackwardInPlace
from .sparse_update import SparseUpdate
from .stream_input_rows import StreamInputRows

__all__ = [
    "AccumulateGradients", "AppendLoss", "QuantizedGradient", "SparseUpdate", "ReorderUpdates", "FuseConvRequant", "FuseExpandDepthwise",
    "FuseWeightUpdate", "FuseDepthwiseBackward", "DepthwiseInPlace", "PointwiseInPlace", "StreamInputRows", "RecomputeStreamedExpansion",
    "CheckpointMasks", "NarrowPeakTiles", "ResidualBackwardInPlace", "PlanMemory", "MemoryPlan", "memory_plan", "pass_config",
]
