"""tvm-tinytrain: on-device int8 training of CNNs under 256 KB, as an Apache TVM plugin."""

from .errors import ModelFormatError, ShapeError, TinyTrainError, UnsupportedOpError
from .model import Model

__version__ = "0.1.0"
__all__ = ["Model", "TinyTrainError", "ModelFormatError", "ShapeError", "UnsupportedOpError"]
