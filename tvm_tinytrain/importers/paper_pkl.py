"""Reader of the paper's int8 model files (``mcunet-5fps.pkl`` and friends).

The files are PyTorch-layout zip archives whose ``*/data.pkl`` pickles plain
dicts and numpy arrays.  Unpickling runs whatever the pickle names, so we use
an unpickler that resolves only the handful of numpy/codecs globals these
files need and refuses everything else before any of it runs.  torch is never
imported.  Format: ``../shared/PAPER.md`` section 1.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, TinyTrainError
from ..model import Add, Conv2D, GlobalAvgPool, Linear, Model, QuantParams, TensorInfo, check_node, conv_out_hw
from ..quant import activation_range

# Larger images than this many pixels a side are no microcontroller model's: a typo, or a damaged file.
MAX_INPUT_SIZE = 4096


def _allowed_globals() -> dict:
    """The only globals the paper's pickles need: numpy array reconstruction."""
    import codecs
    import collections

    from numpy._core import multiarray, numeric

    return {
        ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,  # pickle protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): codecs.encode,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._table = _allowed_globals()

    def find_class(self, module, name):
        try:
            return self._table[(module, name)]
        except KeyError:
            raise ModelFormatError(
                f"{self._path}: refusing to load, the pickle names the disallowed global "
                f"'{module}.{name}' (only plain numpy data is accepted)"
            ) from None

    def persistent_load(self, pid):
        raise ModelFormatError(f"{self._path}: refusing to load, the pickle references external storage {pid!r} (torch tensors are not supported)")


def read_pickle_archive(path: str | Path) -> dict:
    """Return the dict pickled in the archive's ``data.pkl``, read safely."""
    path = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if len(names) != 1:
                raise ModelFormatError(f"{path}: expected exactly one '*/data.pkl' in the archive, found {names or 'none'}")
            data = zf.read(names[0])
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as err:
        raise ModelFormatError(f"{path}: not a readable model archive (zip): {err}") from None
    try:
        obj = _RestrictedUnpickler(data, path).load()
    except ModelFormatError:
        raise
    except Exception as err:  # any malformed pickle stream
        raise ModelFormatError(f"{path}: corrupt pickle in data.pkl: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{path}: data.pkl holds a {type(obj).__name__}, expected a dict")
    return obj


class _Fields:
    """Typed access to nested dict fields, with errors naming the field path."""

    def __init__(self, path: str):
        self.path = path

    def get(self, d, key, where, types, allow_none=False):
        if not isinstance(d, dict):
            raise ModelFormatError(f"{self.path}: field '{where}' must be a dict, got {type(d).__name__}")
        if key not in d:
            raise ModelFormatError(f"{self.path}: missing field '{where}.{key}'")
        v = d[key]
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, types):
            names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            raise ModelFormatError(f"{self.path}: field '{where}.{key}' must be {names}, got {type(v).__name__}")
        return v

    def array(self, d, key, where, dtype, ndim):
        v = self.get(d, key, where, np.ndarray)
        if v.dtype != np.dtype(dtype) or v.ndim != ndim:
            raise ModelFormatError(f"{self.path}: field '{where}.{key}' must be a {ndim}-D {dtype} array, got {v.ndim}-D {v.dtype}")
        return v

    def number(self, d, key, where, kind=float):
        v = self.get(d, key, where, (int, float, np.integer, np.floating))
        return kind(v)


def load_paper_model(path: str | Path) -> Model:
    """Import one of the paper's ``.pkl`` model files as a validated :class:`Model`."""
    path = str(path)
    obj = read_pickle_archive(path)
    f = _Fields(path)
    name = Path(path).stem
    tensors: dict[str, TensorInfo] = {}
    nodes = []

    first = f.get(obj, "first_conv", "model", dict)
    fp = f.get(first, "params", "first_conv", dict)
    size = f.number(first, "in_shape", "first_conv", int)
    if not 1 <= size <= MAX_INPUT_SIZE:
        raise ModelFormatError(f"{path}: field 'first_conv.in_shape' = {size} must be in [1, {MAX_INPUT_SIZE}] (pixels a side)")
    in_ch = f.number(first, "in_channel", "first_conv", int)
    tensors["input"] = TensorInfo("input", (in_ch, size, size), "int8",
                                  QuantParams(f.number(fp, "x_scale", "first_conv.params"), f.number(fp, "x_zero", "first_conv.params", int)))
    cur = "input"

    def conv(layer: dict, where: str, inp: str) -> str:
        p = f.get(layer, "params", where, dict)
        pw = f"{where}.params"
        xq = QuantParams(f.number(p, "x_scale", pw), f.number(p, "x_zero", pw, int))
        _check_same_quant(path, where, inp, tensors[inp].quant, xq)
        yq = QuantParams(f.number(p, "y_scale", pw), f.number(p, "y_zero", pw, int))
        act = f.get(layer, "act", where, str, allow_none=True) if "act" in layer else None
        try:
            qmin, qmax = activation_range(yq.zero_point, yq.scale, act)
        except ValueError as err:
            raise ModelFormatError(f"{path}: field '{where}.act': {err}") from None
        kernel = f.get(layer, "kernel_size", where, (tuple, list, int))
        sides = [kernel] if isinstance(kernel, int) else list(kernel)
        if len(sides) not in (1, 2) or len(set(sides)) != 1 or not all(isinstance(s, int) and s >= 1 for s in sides):
            raise ModelFormatError(f"{path}: field '{where}.kernel_size' = {kernel!r} must be one positive int or two equal ones")
        k = sides[0]
        stride = f.number(layer, "stride", where, int)
        if stride < 1:
            raise ModelFormatError(f"{path}: field '{where}.stride' = {stride} must be at least 1")
        node = Conv2D(
            name=where, input=inp, output=where,
            weight=f.array(p, "weight", pw, "int8", 4),
            bias=f.array(p, "bias", pw, "int32", 1),
            weight_scales=f.array(p, "w_scales", pw, "float32", 1),
            stride=stride,
            groups=f.number(layer, "groups", where, int),
            qmin=qmin, qmax=qmax,
        )
        if node.weight.shape[2] != k:
            raise ModelFormatError(f"{path}: field '{where}.kernel_size' = {kernel} disagrees with weight shape {node.weight.shape}")
        _, h, w = tensors[inp].shape
        ho, wo = conv_out_hw(h, w, node.kernel, node.stride)
        tensors[where] = TensorInfo(where, (node.out_channels, ho, wo), "int8", yq)
        try:
            check_node(tensors, node)
        except TinyTrainError as err:
            raise type(err)(f"{path}: {err}") from None
        nodes.append(node)
        return where

    cur = conv(first, "first_conv", cur)
    blocks = f.get(obj, "blocks", "model", (list, tuple))
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]"
        if not isinstance(block, dict):
            raise ModelFormatError(f"{path}: field '{where}' must be a dict, got {type(block).__name__}")
        if f.get(block, "se", where, dict, allow_none=True) is not None:
            raise ModelFormatError(f"{path}: field '{where}.se': squeeze-excite blocks are not supported")
        block_in = cur
        for part in ("pointwise1", "depthwise", "pointwise2"):
            layer = f.get(block, part, where, dict, allow_none=(part == "pointwise1"))
            if layer is not None:
                cur = conv(layer, f"{where}.{part}", cur)
        res = f.get(block, "residual", where, dict, allow_none=True)
        if res is not None:
            rp = f.get(res, "params", f"{where}.residual", dict)
            rw = f"{where}.residual.params"
            _check_same_quant(path, f"{where}.residual", block_in, tensors[block_in].quant,
                              QuantParams(f.number(rp, "x_scale", rw), f.number(rp, "x_zero", rw, int)))
            out = f"{where}.residual"
            tensors[out] = TensorInfo(out, tensors[cur].shape, "int8", QuantParams(f.number(rp, "y_scale", rw), f.number(rp, "y_zero", rw, int)))
            if tensors[block_in].shape != tensors[cur].shape:
                raise ModelFormatError(f"{path}: field '{where}.residual': block input {tensors[block_in].shape} and output {tensors[cur].shape} differ")
            nodes.append(Add(out, block_in, cur, out))
            cur = out
    if f.get(obj, "feature_mix", "model", dict, allow_none=True) is not None:
        cur = conv(obj["feature_mix"], "feature_mix", cur)

    tensors["pool"] = TensorInfo("pool", (tensors[cur].shape[0],), "int8", tensors[cur].quant)
    nodes.append(GlobalAvgPool("pool", cur, "pool"))
    cls = f.get(obj, "classifier", "model", dict)
    cp = f.get(cls, "params", "classifier", dict)
    _check_same_quant(path, "classifier", "pool", tensors["pool"].quant,
                      QuantParams(f.number(cp, "x_scale", "classifier.params"), f.number(cp, "x_zero", "classifier.params", int)))
    w = f.array(cp, "weight", "classifier.params", "int8", 4)
    if w.shape[2:] != (1, 1):
        raise ModelFormatError(f"{path}: field 'classifier.params.weight' must be a 1x1 conv, got shape {w.shape}")
    tensors["logits"] = TensorInfo("logits", (w.shape[0],), "int8",
                                   QuantParams(f.number(cp, "y_scale", "classifier.params"), f.number(cp, "y_zero", "classifier.params", int)))
    nodes.append(Linear("classifier", "pool", "logits", w.reshape(w.shape[0], w.shape[1]),
                        f.array(cp, "bias", "classifier.params", "int32", 1),
                        f.array(cp, "w_scales", "classifier.params", "float32", 1)))
    model = Model(name, "input", "logits", tensors, nodes)
    try:
        return model.validate()
    except TinyTrainError as err:
        raise type(err)(f"{path}: {err}") from None


def _check_same_quant(path, where, tensor, have: QuantParams, want: QuantParams) -> None:
    """A layer's input params must equal its producer's output params (no hidden requant)."""
    if have.zero_point != want.zero_point or abs(have.scale - want.scale) > 1e-6 * max(have.scale, want.scale):
        raise ModelFormatError(
            f"{path}: field '{where}.params' input quantization (scale {want.scale:g}, zero {want.zero_point}) "
            f"does not match tensor {tensor!r} (scale {have.scale:g}, zero {have.zero_point})"
        )
