"""model.onnx: the frozen QDQ graph as standard ONNX QDQ (QuantizeLinear / DequantizeLinear).

The graph goes through `onnx_ready` (weights as [in, out] for MatMul, uint8 codes on the cpu
target), then torch.onnx's exporter, with the `qfx::` ops translated here one to one:
qfx::quantize -> QuantizeLinear, qfx::dequantize -> DequantizeLinear (axis, block_size),
qfx::quantize_per_token -> ReduceMax/Div/Round/Clip/Cast, qfx::hadamard -> Reshape/Transpose/MatMul
per Kronecker factor, the same arithmetic in the same order as `qfx.runtime`, so ONNX Runtime
computes the numbers torch does. int4/uint4 codes
become packed INT4/UINT4 initializers. Everything else stays float, in torch.onnx's form,
except SiLU and attention, written in torch's own formula and order so that ONNX Runtime's
values match torch's (a float difference can move an activation code downstream).
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript import opset21 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention as exporter_attention

from qfx.lowering.onnx_graph import onnx_ready
from qfx.runtime import numerics, ops
from qfx.runtime.artifact_files import ONNX_FILE
from qfx.runtime.errors import OutputError
from qfx.runtime.formats import QDType
from qfx.runtime.hadamard import hadamard_factors
from qfx.runtime.verify import META_ACTIVATIONS, META_ROOT

ONNX_DATA = "model.onnx.data"
OPSET = 21  # blocked DequantizeLinear (int4 groups) and FP8 QDQ need 21
# Initializers of more bytes than this go to ONNX_DATA: protobuf cannot serialize a message
# over 2 GiB, and the graph itself needs some room.
EXTERNAL_DATA_ABOVE = (2 << 30) - (64 << 20)
PACKED_INT4 = {int(ir.DataType.INT4): ml_dtypes.int4, int(ir.DataType.UINT4): ml_dtypes.uint4}


def onnx_type(q: QDType) -> ir.DataType:
    return getattr(ir.DataType, q.spec.onnx_type)


def numpy_type(q: QDType):
    return getattr(np, q.spec.numpy_type, None) or getattr(ml_dtypes, q.spec.numpy_type)


def _zero(q: QDType):
    return op.Constant(value=ir.tensor(np.zeros((), dtype=numpy_type(q))))


def _quantize(x, scale, zero_point, qdtype: str, axis: int, group_size: int):
    q = QDType(qdtype)
    if q.spec.native_max is not None:
        # qfx caps FNUZ at 224 (every code has an FN twin); QuantizeLinear would saturate at 240.
        # Where, not Clip or Min/Max: ONNX Runtime's Clip->QuantizeLinear fusion rejects FNUZ,
        # and the exporter's optimizer turns Min/Max into Clip.
        bound = op.Mul(scale, op.Constant(value_float=q.qmax))
        low = op.Neg(bound)
        x = op.Where(op.Greater(x, bound), bound, op.Where(op.Less(x, low), low, x))
    if zero_point is None:
        zero_point = _zero(q)
    return op.QuantizeLinear(x, scale, zero_point, axis=axis, block_size=group_size)


def _dequantize(codes, scale, zero_point, qdtype: str, axis: int, group_size: int, out_dtype):
    q = QDType(qdtype)
    if axis == -1:  # per-token codes with their [..., 1] scale: plain arithmetic
        y = op.Mul(op.Cast(codes, to=ir.DataType.FLOAT), scale)
    else:
        if q.bits == 4:  # int4 codes sit in int8 in the graph; _pack_int4 folds this cast into the initializer
            codes = op.Cast(codes, to=onnx_type(q))
            if zero_point is not None:
                zero_point = op.Cast(zero_point, to=onnx_type(q))
        args = (codes, scale) if zero_point is None else (codes, scale, zero_point)
        y = op.DequantizeLinear(*args, axis=axis, block_size=group_size)
    return y if out_dtype == ir.DataType.FLOAT else op.Cast(y, to=out_dtype)


def _quantize_per_token(x, qdtype: str):
    q = QDType(qdtype)
    amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    scale = op.Max(op.Div(amax, op.Constant(value_float=q.qmax)), op.Constant(value_float=numerics.MIN_SCALE))
    y = op.Div(x, scale)
    lo, hi = op.Constant(value_float=q.qmin), op.Constant(value_float=q.qmax)
    if not q.is_float:
        y = op.Round(y)
    return op.Cast(op.Clip(y, lo, hi), to=onnx_type(q)), scale


def _silu(x):
    # torch computes SiLU as x / (1 + exp(-x)). The exporter's x * Sigmoid(x) runs on ONNX
    # Runtime's approximate Sigmoid, which differed from torch in 62% of elements (measured on
    # N(0, 4^2) inputs); this form differs in 4%, by one ulp. Each difference can move an
    # activation code downstream (down_proj inputs), and FP8's coarse codes make that costly.
    return op.Div(x, op.Add(op.Exp(op.Neg(x)), op.CastLike(op.Constant(value_float=1.0), x)))


def _attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: float | None = None, enable_gqa: bool = False):
    """softmax(Q @ K^T * scale + mask) @ V, in the order torch's CPU kernel computes it and in
    the form ONNX Runtime fuses: Transpose and the constant scale fold into one FusedMatMul.
    The exporter's own form scales Q and K by sqrt(scale) through a reshape/transpose of K and
    guards the softmax with IsNaN/Where, which cannot fire here (masked scores are the float
    minimum, never -inf) and cost about 3 ms of a 150 ms Llama run. Training-time variants
    (dropout, is_causal without a mask, grouped KV) and non-float32 graphs keep the exporter's
    form."""
    head = query.shape[-1] if query.shape is not None and len(query.shape) == 4 else None
    if dropout_p or is_causal or enable_gqa or not isinstance(head, int) or query.dtype != ir.DataType.FLOAT:
        return exporter_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    factor = op.Constant(value_float=scale if scale is not None else 1.0 / math.sqrt(head))
    scores = op.Mul(op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2])), factor)
    if attn_mask is not None:
        # As in the exporter's form: the float minimum, not torch's -inf, so a row with every key
        # masked (a padding position) averages V here where torch gives zeros.
        if attn_mask.dtype == ir.DataType.BOOL:
            attn_mask = op.Where(attn_mask, op.Constant(value_float=0.0),
                                 op.Constant(value_float=float(np.finfo(np.float32).min)))
        scores = op.Add(scores, attn_mask)
    return op.MatMul(op.Softmax(scores, axis=-1), value)


def _hadamard(x):
    """qfx::hadamard as Reshape / Transpose / MatMul per Kronecker factor, then the 1/sqrt(n)
    scale: the steps of qfx.runtime.hadamard.hadamard_transform, in its order."""
    n = x.shape[-1] if x.shape is not None else None
    if not isinstance(n, int):
        raise ValueError("qfx::hadamard needs a fixed last dimension to export")
    y, rest = x, n
    for factor in hadamard_factors(n):
        order = factor.shape[0]
        rest //= order
        y = op.Transpose(op.Reshape(y, op.Constant(value_ints=[-1, order, rest])), perm=[0, 2, 1])
        y = op.Transpose(op.MatMul(y, op.CastLike(op.Constant(value=ir.tensor(factor.numpy().astype(np.float32))), x)),
                         perm=[0, 2, 1])
    return op.Mul(op.Reshape(y, op.Shape(x)), op.CastLike(op.Constant(value_float=1.0 / n ** 0.5), x))


TRANSLATIONS = {ops.QUANTIZE: _quantize, ops.DEQUANTIZE: _dequantize, ops.QUANTIZE_PER_TOKEN: _quantize_per_token,
                ops.HADAMARD: _hadamard, torch.ops.aten.silu.default: _silu,
                torch.ops.aten.scaled_dot_product_attention.default: _attention}


def _pack_int4(model: onnx.ModelProto) -> None:
    """Cast(int8 initializer -> INT4/UINT4) becomes a packed INT4/UINT4 initializer, the form
    runtimes fuse (DequantizeLinear -> MatMul into MatMulNBits) and half the bytes."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for node in list(graph.node):
        if node.op_type != "Cast" or node.input[0] not in inits:
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        if to not in PACKED_INT4:
            continue
        source = inits[node.input[0]]
        values = onnx.numpy_helper.to_array(source).astype(PACKED_INT4[to])
        packed = onnx.numpy_helper.from_array(values, name=source.name)
        if readers[source.name] == 1:
            graph.initializer.remove(source)
        else:
            packed.name = node.output[0]
        for reader in graph.node:
            for i, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[i] = packed.name
        graph.initializer.append(packed)
        graph.node.remove(node)
        for info in [v for v in graph.value_info if v.name in (source.name, node.output[0])]:
            graph.value_info.remove(info)  # they typed the int8 source; shape inference retypes


def _activation_values(model: onnx.ModelProto, prefix: str) -> dict[str, list[str]]:
    """ONNX value name of each dequantized activation -> [layer path, role], read from the
    exporter's per-node scope metadata while it is still there. `qfx verify` feeds these values
    from ONNX Runtime into the torch model, layer by layer."""
    out = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "qfx.dequantize.default" not in meta.get("pkg.torch.onnx.fx_node", ""):
            continue
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        if len(scopes) < 2 or scopes[-1] not in node.output:
            continue  # not the node that yields the dequantized value
        scale = node.input[1]
        if scale.endswith("weight_scale"):
            continue
        role = "output" if scale.endswith("output_scale") else "input"
        out[scopes[-1]] = [scopes[-2].removeprefix(prefix), role]
    return out


def _export_failure(gm: torch.fx.GraphModule, message: str, describe_node: Callable | None) -> str:
    """What the exporter could not translate: the node, its module, the spec rules that
    quantized it, and the exporter's reason."""
    found = re.search(r"translating node %(\S+) .*?target=([\w.]+)", message)
    reasons = re.findall(r"(?:DispatchError|ConversionError)'>: (.+)", message)
    reason = reasons[0] if reasons else next((ln.strip() for ln in message.splitlines() if ln.strip()), "")
    if not found:
        return f"ONNX export failed: {reason}"
    name, target = found.groups()
    node = next((n for n in gm.graph.nodes if n.name == name), None) or next(
        (n for n in gm.graph.nodes if n.op == "call_function" and f"torch.ops.{n.target}" == target), None)
    where = f"node {name} ({target.removeprefix('torch.ops.')})"
    origin = describe_node(node) if node is not None and describe_node is not None else ""
    return f"ONNX export failed at {where}{' ' + origin if origin else ''}: {reason}"


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress to stdout and warns about things that do not concern a
    qfx graph (torchvision ops, deprecations); a failure still raises with the full reason."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write_onnx(folder: Path, gm: torch.fx.GraphModule, *, example: tuple, dynamic_shapes, input_names: list[str],
               output_names: list[str], uint8_codes: bool, opset: int = OPSET, metadata: dict[str, str],
               describe_node: Callable[[torch.fx.Node], str] | None = None) -> list[str]:
    """Write model.onnx (and model.onnx.data for models over 2 GB); return the files written.
    `describe_node` says where a graph node comes from, for the error when one cannot be exported."""
    ready = onnx_ready(gm, uint8_codes).eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(ready, example, dynamo=True, opset_version=opset,
                                        custom_translation_table=TRANSLATIONS, dynamic_shapes=dynamic_shapes,
                                        input_names=input_names, output_names=output_names, verbose=False,
                                        optimize=False)
    except Exception as exc:  # the exporter raises many types; all become one clear error
        raise OutputError(_export_failure(ready, f"{type(exc).__name__}: {exc}", describe_node),
                          hint="exclude that module in the spec, or drop onnx from output.formats") from None
    model = program.model_proto
    _pack_int4(model)
    metadata = dict(metadata, **{META_ACTIVATIONS: json.dumps(
        _activation_values(model, metadata.get(META_ROOT, "")), sort_keys=True)})
    for node in model.graph.node:
        del node.metadata_props[:]  # exporter notes, including stack traces with this machine's paths
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=value)
    path = folder / ONNX_FILE
    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_ABOVE
    onnx.save_model(model, path, save_as_external_data=big, all_tensors_to_one_file=True, location=ONNX_DATA)
    onnx.checker.check_model(str(path), full_check=True)
    return [ONNX_FILE, ONNX_DATA] if big else [ONNX_FILE]
