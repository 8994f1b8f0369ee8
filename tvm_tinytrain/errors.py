"""Errors raised for bad user input.

Every error a user can provoke with a bad model file, shape, scheme or budget
is a :class:`TinyTrainError`, whose message names the file, node, field or
budget at fault.  The CLI prints these as one line and exits non-zero instead
of showing a traceback from inside TVM.
"""


class TinyTrainError(ValueError):
    """Base class of every user-facing error of tvm-tinytrain."""


class ModelFormatError(TinyTrainError):
    """A model file is unreadable, unsafe, or has missing/mistyped fields."""


class UnsupportedOpError(TinyTrainError):
    """A model uses an operator (or attribute) that tvm-tinytrain cannot express."""


class ShapeError(TinyTrainError):
    """A tensor does not have the shape or dtype the model expects."""


def _register_with_tvm_ffi() -> None:
    """Keep our error types when they cross TVM's FFI (e.g. raised inside a pass run by ``Sequential``)."""
    import tvm_ffi

    for cls in (TinyTrainError, ModelFormatError, UnsupportedOpError, ShapeError):
        tvm_ffi.register_error(cls.__name__, cls)


_register_with_tvm_ffi()
