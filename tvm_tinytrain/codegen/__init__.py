"""Plain C for the int8 training step: TVM-lowered kernels plus a planned step function (no runtime, no malloc).

``generate(mod, out_dir)`` writes ``tinytrain_model.h``/``.c``, ``tinytrain_kernels.c`` and
``tinytrain_meta.json`` for a module from :func:`tvm_tinytrain.trainer.build_training_module`.
"""

from .step import generate

__all__ = ["generate"]
