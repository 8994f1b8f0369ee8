"""The DSP helpers and the pointwise GEMM kernel built on them, against numpy.

Each helper has three forms (tvm_tinytrain/ops/dsp.py): plain TIR for llvm, portable C for the host and the
ACLE intrinsic on a Cortex-M.  The first two are checked here against a numpy definition of the instruction;
the third is checked against the host build bit for bit by the whole-step board test of MCUNet paper-99kb
(test_device.py), whose convs (the first one, and the 1x1 ones, plain and merged) and inverted blocks run
the kernels below. The float32 multiply-accumulate helper is checked the same way.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm.script import tirx as T

from tvm_tinytrain.ops import dsp, reference, tir_conv_gemm, tir_depthwise, tir_expand_depthwise
from tvm_tinytrain.ops.constants import Requant
from tvm_tinytrain.ops.schedule import kernel_variant
from tvm_tinytrain.quant import quantize_multipliers


def _lanes(v):
    v = np.asarray(v, np.int64)
    return ((v & 0xFFFF) ^ 0x8000) - 0x8000, v >> 16


def _byte(v, k):
    return (((np.asarray(v, np.int64) >> (8 * k)) & 0xFF) ^ 0x80) - 0x80


def _wrap(v):
    return ((np.asarray(v, np.int64) + 2**31) % 2**32 - 2**31).astype(np.int64)


def _pack(lo, hi):
    return _wrap((np.asarray(lo, np.int64) & 0xFFFF) | (np.asarray(hi, np.int64) << 16))


def numpy_helper(name, a, b, c):
    """The instruction's definition (Arm ARM), on int64 arrays."""
    if name == dsp.SMLAD:
        (alo, ahi), (blo, bhi) = _lanes(a), _lanes(b)
        return _wrap(c + alo * blo + ahi * bhi)
    if name == dsp.SXTB16:
        return _pack(_byte(a, 0), _byte(a, 2))
    if name == dsp.SXTB16_ROR8:
        return _pack(_byte(a, 1), _byte(a, 3))
    if name == dsp.PACK16:
        return _pack(a, b)
    if name == dsp.PACK16_HI:
        return _pack(_lanes(a)[1], _lanes(b)[1])
    if name == dsp.SSUB16:
        (alo, ahi), (blo, bhi) = _lanes(a), _lanes(b)
        return _pack(alo - blo, ahi - bhi)  # each halfword wraps
    if name == dsp.SSAT8:
        return np.clip(np.asarray(a, np.int64), -128, 127)
    return np.clip(np.asarray(a, np.int64) + b, -(2**31), 2**31 - 1)  # QADD


ARITY = {dsp.SMLAD: 3, dsp.SXTB16: 1, dsp.SXTB16_ROR8: 1, dsp.PACK16: 2, dsp.PACK16_HI: 2, dsp.SSUB16: 2, dsp.QADD: 2,
         dsp.SSAT8: 1}
int32s = st.integers(-(2**31), 2**31 - 1)
int16s = st.integers(-(2**15), 2**15 - 1)


def _operands(name, data):
    if name == dsp.PACK16:  # its operands are int16 values
        return data.draw(st.lists(int16s, min_size=8, max_size=8)), data.draw(st.lists(int16s, min_size=8, max_size=8))
    if name == dsp.SMLAD:  # as the kernels use it: no overflow of the 32-bit sum
        a, b = (data.draw(st.lists(int32s, min_size=8, max_size=8)) for _ in range(2))
        return a, b, data.draw(st.lists(st.integers(-(2**29), 2**29), min_size=8, max_size=8))
    return tuple(data.draw(st.lists(int32s, min_size=8, max_size=8)) for _ in range(ARITY[name]))


def _tir_helper(name):
    fn = {dsp.SMLAD: dsp.smlad, dsp.SXTB16: dsp.sxtb16, dsp.SXTB16_ROR8: dsp.sxtb16_ror8, dsp.PACK16: dsp.pack16,
          dsp.PACK16_HI: dsp.pack16_hi, dsp.SSUB16: dsp.ssub16, dsp.QADD: dsp.qadd, dsp.SSAT8: dsp.ssat8}[name]
    n = ARITY[name]

    @T.prim_func
    def main(a: T.Buffer((8,), "int32"), b: T.Buffer((8,), "int32"), c: T.Buffer((8,), "int32"), y: T.Buffer((8,), "int32")):
        for i in range(8):
            y[i] = fn(*[a[i], b[i], c[i]][:n])

    return tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": main})), target="llvm")


@pytest.fixture(scope="module")
def host_c(tmp_path_factory):
    """The portable C helpers, compiled by the host gcc into a library."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required (README set-up)")
    work = tmp_path_factory.mktemp("dsp")
    calls = "\n".join(f"int32_t call_{name}(int32_t a, int32_t b, int32_t c) {{ return {name}({', '.join('abc'[:n])}); }}"
                      for name, n in ARITY.items())
    (work / "dsp.c").write_text("#include <stdint.h>\n#include <string.h>\n" + dsp.C_SOURCE + calls + "\n"
                                "int32_t call_load(const int8_t *p) { return tinytrain_load_i32(p); }\n"
                                "float call_fmla(float acc, float a, float b) { return tinytrain_fmla(acc, a, b); }\n")
    subprocess.run(["gcc", "-O2", "-std=c99", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(work / "dsp.so"), str(work / "dsp.c")], check=True)
    lib = ctypes.CDLL(str(work / "dsp.so"))
    for name in ARITY:
        getattr(lib, f"call_{name}").restype = ctypes.c_int32
        getattr(lib, f"call_{name}").argtypes = [ctypes.c_int32] * 3
    lib.call_load.restype = ctypes.c_int32
    lib.call_fmla.restype = ctypes.c_float
    lib.call_fmla.argtypes = [ctypes.c_float] * 3
    return lib


@pytest.mark.parametrize("name", list(ARITY))
@given(data=st.data())
@settings(max_examples=10, deadline=None)
def test_helper_llvm_and_host_c_match_the_instruction(name, data, host_c):
    ops = [np.array(v, np.int64) for v in _operands(name, data)]
    a, b, c = (ops + [np.zeros(8, np.int64)] * 3)[:3]
    want = numpy_helper(name, a, b, c)
    out = tvm.runtime.empty((8,), "int32")
    _tir_helper(name)(*[tvm.runtime.tensor(v.astype(np.int32)) for v in (a, b, c)], out)
    np.testing.assert_array_equal(out.numpy(), want)
    got_c = [getattr(host_c, f"call_{name}")(int(x), int(y), int(z)) for x, y, z in zip(a, b, c)]
    np.testing.assert_array_equal(got_c, want)


@given(a=st.lists(int32s, min_size=8, max_size=8), b=st.lists(int32s, min_size=8, max_size=8))
@settings(max_examples=10, deadline=None)
def test_column_pair_is_byte_j_of_both_words(a, b):
    """The pair the depthwise, GEMM and expansion kernels stage: column j of two rows' four-column loads."""

    @T.prim_func
    def main(x: T.Buffer((8,), "int32"), z: T.Buffer((8,), "int32"), y: T.Buffer((4, 8), "int32")):
        for i in range(8):
            y[0, i] = dsp.column_pair(x[i], z[i], 0)
            y[1, i] = dsp.column_pair(x[i], z[i], 1)
            y[2, i] = dsp.column_pair(x[i], z[i], 2)
            y[3, i] = dsp.column_pair(x[i], z[i], 3)

    out = tvm.runtime.empty((4, 8), "int32")
    words = [np.array(v, np.int64) for v in (a, b)]
    tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": main})), target="llvm")(
        *[tvm.runtime.tensor(v.astype(np.int32)) for v in words], out)
    np.testing.assert_array_equal(out.numpy(), [_pack(_byte(words[0], j), _byte(words[1], j)) for j in range(4)])


def test_load_i32_is_little_endian_at_any_offset(host_c):
    data = np.array([0x01, 0x82, 0x7F, 0xFE, 0x10, 0x80], np.uint8).view(np.int8)

    @T.prim_func
    def main(x: T.Buffer((6,), "int8"), y: T.Buffer((3,), "int32")):
        for i in range(3):
            y[i] = dsp.load_i32(x[i])

    out = tvm.runtime.empty((3,), "int32")
    tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": main})), target="llvm")(tvm.runtime.tensor(data), out)
    want = [int(np.frombuffer(data.tobytes()[i:i + 4], "<i4")[0]) for i in range(3)]
    np.testing.assert_array_equal(out.numpy(), want)
    base = ctypes.cast(ctypes.create_string_buffer(data.tobytes(), 6), ctypes.POINTER(ctypes.c_int8))
    assert [host_c.call_load(ctypes.cast(ctypes.addressof(base.contents) + i, ctypes.POINTER(ctypes.c_int8))) for i in range(3)] == want


@given(triples=st.lists(st.tuples(*[st.floats(-(2.0**60), 2.0**60, width=32)] * 3), min_size=1, max_size=20))
@settings(max_examples=20, deadline=None)
def test_fmla_rounds_the_product_then_the_sum(host_c, triples):
    for acc, a, b in triples:
        want = np.float32(acc) + np.float32(np.float32(a) * np.float32(b))
        assert np.float32(host_c.call_fmla(acc, a, b)).tobytes() == np.float32(want).tobytes()


def test_use_multiply_accumulate_rewrites_only_float_accumulations():
    @T.prim_func
    def main(g: T.Buffer((8,), "float32"), w: T.Buffer((8,), "float32"), y: T.Buffer((2,), "float32"), z: T.Buffer((2,), "int32")):
        for i in range(8):
            y[0] = y[0] + g[i] * w[i]  # an accumulation
            y[1] = y[0] + g[i] * w[i]  # not one: another element
            z[0] = z[0] + i * i  # int32: the C compiler's MLA already
    text = dsp.UseMultiplyAccumulate()(tvm.IRModule({"main": main}))["main"].script()
    assert text.count(dsp.FMLA) == 1
    assert 'y[0] = T.call_pure_extern("float32", "tinytrain_fmla", y[0], g[i], w[i])' in text


@st.composite
def gemm_cases(draw):
    k = draw(st.sampled_from([1, 1, 3]))
    stride = 1 if k == 1 else draw(st.sampled_from([1, 2]))
    # 1x1: up to 10 groups of four taps, so the long loop takes one, two and four groups per iteration
    # (and 1x1 convs of any channel count: taps that are not whole groups of four are staged, zero-padded)
    ic = draw(st.one_of(st.sampled_from([4, 8, 12, 20, 24, 32, 40]), st.integers(1, 9))) if k == 1 else draw(st.integers(1, 5))
    oc = 2 * draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 5)), 2 * stride * draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.integers(-128, 128, (1, ic, h, w)).astype(np.int8)
    wt = rng.integers(-128, 128, (oc, ic, k, k)).astype(np.int8)
    bias = rng.integers(-50000, 50000, oc).astype(np.int32)
    bias[0] = draw(st.sampled_from([-(2**31), 2**31 - 1, 0]))  # the saturating add
    wide = draw(st.booleans())
    scales = [draw(st.floats(1e-6, 0.2) if wide else st.floats(1e-3, 4.0)) for _ in range(oc)]
    mult, shift = quantize_multipliers(scales)
    qmin = draw(st.one_of(st.just(-128), st.integers(-128, 0)))  # often the whole int8 range (one SSAT)
    rq = Requant(mult, shift, draw(st.integers(-128, 127)), qmin, draw(st.one_of(st.just(127), st.integers(qmin, 127))))
    # often none merged: a 1x1 conv of up to 8 input channels then holds its weights (the weight-stationary loop)
    channels = tuple(draw(st.permutations(range(ic)))[:draw(st.one_of(st.just(0), st.integers(0, ic)))]) if k == 1 else ()
    trained = rng.integers(-128, 128, (oc, len(channels), 1, 1)).astype(np.int8)
    return x, wt, trained, channels, bias, rq, draw(st.integers(-128, 127)), stride, wide and int(shift.min()) >= 33


@given(gemm_cases())
@settings(max_examples=30, deadline=None)
def test_conv_gemm_matches_reference_conv_and_requantize(case):
    """1x1 convs with plain and merged (SparseUpdate's partially trained) weights, 3x3 convs with padding, stride
    and taps that are not whole groups of four; wide and int64 requantization."""
    x, wt, trained, channels, bias, rq, x_zero, stride, wide = case
    merged = wt.copy()
    merged[:, list(channels)] = trained
    want = reference.requantize(reference.conv2d_acc(x, merged, x_zero, stride, 1), bias, rq)
    (_, ic, h, w), (oc, _, k, _) = x.shape, wt.shape
    assert tir_conv_gemm.fits(ic, oc, 1, want.shape[3], k, merged=bool(channels))
    with kernel_variant("optimized"):  # as the passes build it: with SSAT for a full-range clamp
        func = tir_conv_gemm.conv_requant(ic, oc, h, w, k, stride, x_zero, rq.y_zero, rq.qmin, rq.qmax, wide, channels)
    fn = tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})), target="llvm")
    out = tvm.runtime.empty(want.shape, "int8")
    inputs = (x, wt, *((trained,) if channels else ()), bias, rq.mult, rq.shift)
    fn(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs], out)
    np.testing.assert_array_equal(out.numpy(), want)


def test_conv_gemm_takes_only_the_shapes_it_fits():
    assert tir_conv_gemm.fits(8, 6, 1, 4)
    assert tir_conv_gemm.fits(3, 16, 1, 64, k=3)  # the first conv: 27 taps, weight rows staged
    assert not tir_conv_gemm.fits(8, 5, 1, 4)  # output channels in pairs
    assert not tir_conv_gemm.fits(8, 6, 1, 3)  # output pixels in pairs along a row
    assert not tir_conv_gemm.fits(8, 6, 2, 4)  # batch 1
    assert not tir_conv_gemm.fits(8, 6, 1, 4, k=3, merged=True)  # merged weights: 1x1 only
    assert not tir_conv_gemm.fits(63, 64, 1, 4, k=3)  # 567 taps x 64 rows: too many weight bytes to stage


@st.composite
def block_cases(draw):
    ic, c = 4 * draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 5)), 4 * draw(st.integers(1, 3))
    k, stride = draw(st.sampled_from([3, 5, 7])), draw(st.sampled_from([1, 2]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.integers(-128, 128, (1, ic, h, w)).astype(np.int8)
    w_pw = rng.integers(-128, 128, (c, ic, 1, 1)).astype(np.int8)
    w_dw = rng.integers(-128, 128, (c, 1, k, k)).astype(np.int8)
    wides, params = [], []
    for _ in range(2):
        bias = rng.integers(-5000, 5000, c).astype(np.int32)
        bias[0] = draw(st.sampled_from([-(2**31), 2**31 - 1, 0]))
        wide = draw(st.booleans())
        mult, shift = quantize_multipliers([draw(st.floats(1e-5, 0.05) if wide else st.floats(1e-3, 2.0)) for _ in range(c)])
        qmin = draw(st.one_of(st.just(-128), st.integers(-128, 0)))
        rq = Requant(mult, shift, draw(st.integers(-128, 127)), qmin, draw(st.one_of(st.just(127), st.integers(qmin, 127))))
        wides.append(wide and int(shift.min()) >= 33)
        params.append((bias, rq))
    return x, w_pw, w_dw, params, draw(st.integers(-128, 127)), k, stride, wides


@given(block_cases())
@settings(max_examples=25, deadline=None)
def test_expand_depthwise_matches_reference_convs(case):
    """The expansion conv, its requantization, the depthwise conv over the result and its requantization."""
    x, w_pw, w_dw, ((b1, rq1), (b2, rq2)), x_zero, k, stride, wide = case
    expanded = reference.requantize(reference.conv2d_acc(x, w_pw, x_zero, 1, 1), b1, rq1)
    want = reference.requantize(reference.conv2d_acc(expanded, w_dw, rq1.y_zero, stride, w_dw.shape[0]), b2, rq2)
    _, ic, h, w = x.shape
    convs = [{"x_zero": zx, "y_zero": rq.y_zero, "qmin": rq.qmin, "qmax": rq.qmax} for zx, rq in ((x_zero, rq1), (rq1.y_zero, rq2))]
    with kernel_variant("optimized"):
        func = tir_expand_depthwise.expand_depthwise(ic, w_pw.shape[0], h, w, k, stride, *convs, tuple(wide))
    fn = tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})), target="llvm")
    out = tvm.runtime.empty(want.shape, "int8")
    fn(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (x, w_pw, b1, rq1.mult, rq1.shift, w_dw, b2, rq2.mult, rq2.shift)], out)
    np.testing.assert_array_equal(out.numpy(), want)


@given(block_cases(), st.booleans(), st.integers(0, 3))
@settings(max_examples=20, deadline=None)
def test_depthwise_conv_matches_reference(case, band, extra_rows):
    """The depthwise half of the block cases, alone: its input staged from memory, as DepthwiseInPlace runs it, or,
    as a band kernel (``pad_h=0``), read in place from a window of ``k`` rows or a few more, with no top or bottom
    padding; each of its output rows is then the padded conv's row centred on the window's middle row."""
    x, w_pw, w_dw, ((b1, rq1), (b2, rq2)), x_zero, k, stride, wide = case
    c = w_dw.shape[0]
    # A plane of its own for each channel of the depthwise weight: a kernel reading another channel's plane fails.
    # A band's window has k + extra_rows rows: enough for (extra_rows // stride) + 1 output rows.
    rows = k + extra_rows if band else x.shape[2]
    planes = np.random.default_rng(int(x[0, 0, 0, 0]) + 128).integers(-128, 128, (1, c, rows, x.shape[3])).astype(np.int8)
    if band:
        pad, ho = (k - 1) // 2, extra_rows // stride + 1
        full = reference.conv2d_acc(planes, w_dw, x_zero, 1, c)  # stride 1, centred on each input pixel
        acc = full[:, :, pad + stride * np.arange(ho)][:, :, :, ::stride]
    else:
        acc = reference.conv2d_acc(planes, w_dw, x_zero, stride, c)
    want = reference.requantize(acc, b2, rq2)
    _, c, h, w = planes.shape
    conv = {"x_zero": x_zero, "y_zero": rq2.y_zero, "qmin": rq2.qmin, "qmax": rq2.qmax}
    with kernel_variant("optimized"):
        func = tir_depthwise.depthwise_conv_requant(c, h, w, k, stride, conv, wide[1], 0 if band else None)
    fn = tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})), target="llvm")
    out = tvm.runtime.empty(want.shape, "int8")
    fn(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (planes, w_dw, b2, rq2.mult, rq2.shift)], out)
    np.testing.assert_array_equal(out.numpy(), want)
