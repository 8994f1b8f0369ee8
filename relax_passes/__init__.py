"""tvm-tinytrain's Relax graph passes (AppendLoss, QuantizedGradient, SparseUpdate, ReorderUpdates, PlanMemory).

Each pass is a standard ``tvm.transform.Pass``, composable with TVM's own in
``tvm.transform.Sequential`` and configured through ``PassContext`` options.
They arrive with the training-graph issue; nothing is exported yet.
"""
