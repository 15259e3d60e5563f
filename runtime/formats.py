"""Concrete quantization formats: what one tensor's quantization is, with nothing left open.

The spec speaks in user words (`fp8_e4m3`, `per_channel`); the compiler resolves them into
these frozen values (the FP8 variant fixed by the target), and they travel unchanged through
graph meta, the artifact manifest and the runtime loader.
"""
from __future__ import annotations

import dataclasses
import enum

import torch


@dataclasses.dataclass(frozen=True)
class CodeSpec:
    """Everything qfx knows about one element format. Other modules ask these properties (through
    QDType) rather than comparing format names, so a new format is one entry in CODE_SPECS."""

    bits: int
    is_float: bool
    qmin: float
    qmax: float
    storage: torch.dtype  # what holds one code in a graph (4-bit codes sit unpacked in 8 bits)
    onnx_type: str | None  # the onnx_ir DataType member; None: ONNX has no such type
    numpy_type: str | None  # numpy / ml_dtypes type of an initializer; None: 4-bit, packed by the emitter
    # The dtype a checkpoint holds the codes in when the layout stores them unpacked (None: packed
    # by the layout). E4M3FNUZ has no safetensors dtype: its codes are stored as their E4M3FN twins.
    checkpoint_dtype: torch.dtype | None
    min_exponent: int | None = None  # float formats: the exponent of the smallest normal value
    native_max: float | None = None  # where the type itself saturates above qmax (qfx caps the range)
    # Non-uniform formats: code i stands for table[i] x scale (spanning [qmin, qmax], in the order of
    # the codes a consumer reads, ascending or not); a value x is coded as the nearest entry to
    # x * (1 / scale), a tie going to the lower entry (of equal entries, the lower code).
    table: tuple[float, ...] | None = None
    # OCP MX formats: elements of this float format (exponent bits, mantissa bits), each block of
    # MX_BLOCK along K sharing one power-of-two (E8M0) scale, which the block's own absmax sets
    # (numerics.mx_scale) — for weights and, at run time, for activations.
    mx_element: tuple[int, int] | None = None

    @property
    def mx_emax(self) -> int:
        """The exponent of the element format's largest binade (OCP's emax): 2**(ebits - 1)."""
        return 2 ** (self.mx_element[0] - 1)


MX_BLOCK = 32  # elements per E8M0 scale in every OCP MX format


def _mx_table(ebits: int, mbits: int) -> tuple[float, ...]:
    """An MX element format's values in code order (sign bit, exponent field, mantissa field):
    subnormals below the smallest normal exponent 2 - 2**(ebits - 1), no infinities or NaN."""
    bias = 2 ** (ebits - 1) - 1
    magnitudes = []
    for field in range(2**ebits):
        for m in range(2**mbits):
            fraction = m / 2**mbits
            magnitudes.append(fraction * 2.0 ** (1 - bias) if field == 0 else (1 + fraction) * 2.0 ** (field - bias))
    return tuple(magnitudes + [-v for v in magnitudes])


class QDType(str, enum.Enum):
    int8 = "int8"
    uint8 = "uint8"
    int4 = "int4"
    uint4 = "uint4"
    # Weight-only widths between: stored by the layouts that pack them (compressed-tensors densely;
    # GPTQ at 2 bits); ONNX has no type for them at opset 21.
    int2, uint2, int3, uint3 = "int2", "uint2", "int3", "uint3"
    int5, uint5, int6, uint6, int7, uint7 = "int5", "uint5", "int6", "uint6", "int7", "uint7"
    fp8_e4m3fn = "fp8_e4m3fn"  # OCP E4M3 (gfx950, NVIDIA): max 448
    # MI300 (gfx942). Its own max is 240, but qfx caps it at 224 (= 448 / 2) so that every
    # code has an exact OCP E4M3FN twin: safetensors stores FN (what Quark and vLLM load,
    # vLLM converting back on MI300 by doubling the scale), and both must compute the same.
    fp8_e4m3fnuz = "fp8_e4m3fnuz"
    nf4 = "nf4"  # NormalFloat4 (QLoRA): 16 quantiles of a normal distribution, scaled by the block's absmax
    bnb_fp4 = "bnb_fp4"  # bitsandbytes' FP4 (its quant_type "fp4"): a 16-entry table, like nf4
    # OCP Microscaling (MI350 / gfx950): FP4 E2M1, FP6 E2M3 / E3M2, FP8 E4M3 elements, E8M0 scales
    mxfp4, mxfp6_e2m3, mxfp6_e3m2, mxfp8 = "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8"

    @property
    def spec(self) -> CodeSpec:
        return CODE_SPECS[self]

    @property
    def is_float(self) -> bool:
        return self.spec.is_float

    @property
    def is_integer(self) -> bool:
        """Codes that are evenly spaced integers (round, clamp, zero points, integer matmul)."""
        return not self.spec.is_float and self.spec.table is None

    @property
    def table(self) -> torch.Tensor | None:
        """The code table as float32 (None for uniform formats)."""
        return None if self.spec.table is None else torch.tensor(self.spec.table, dtype=torch.float32)

    @property
    def is_mx(self) -> bool:
        """An OCP MX format (CodeSpec.mx_element)."""
        return self.spec.mx_element is not None

    @property
    def is_signed(self) -> bool:
        return self.spec.qmin < 0

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def qmin(self) -> float:
        return self.spec.qmin

    @property
    def qmax(self) -> float:
        return self.spec.qmax

    @property
    def storage(self) -> torch.dtype:
        return self.spec.storage

    @property
    def stored_as_twin(self) -> bool:
        """Whether checkpoints hold these codes as another float type's bits (E4M3FNUZ as E4M3FN,
        worth twice as much: numerics.fnuz_to_fn; a stored scale halves)."""
        return self.spec.is_float and self.spec.checkpoint_dtype != self.spec.storage


CODE_SPECS = {
    QDType.int8: CodeSpec(8, False, -128, 127, torch.int8, "INT8", "int8", torch.int8),
    QDType.uint8: CodeSpec(8, False, 0, 255, torch.uint8, "UINT8", "uint8", torch.uint8),
    QDType.int4: CodeSpec(4, False, -8, 7, torch.int8, "INT4", None, None),
    QDType.uint4: CodeSpec(4, False, 0, 15, torch.uint8, "UINT4", None, None),
    **{QDType(f"{sign}int{bits}"): CodeSpec(bits, False, -(2 ** (bits - 1)) if sign == "" else 0,
                                            2 ** (bits - 1) - 1 if sign == "" else 2 ** bits - 1,
                                            torch.int8 if sign == "" else torch.uint8, None, None, None)
       for bits in (2, 3, 5, 6, 7) for sign in ("", "u")},
    QDType.fp8_e4m3fn: CodeSpec(8, True, -448.0, 448.0, torch.float8_e4m3fn, "FLOAT8E4M3FN", "float8_e4m3fn",
                                torch.float8_e4m3fn, min_exponent=-6),
    QDType.fp8_e4m3fnuz: CodeSpec(8, True, -224.0, 224.0, torch.float8_e4m3fnuz, "FLOAT8E4M3FNUZ",
                                  "float8_e4m3fnuz", torch.float8_e4m3fn, min_exponent=-7, native_max=240.0),
    # No ONNX type: ONNX has no NF4 (the emitter refuses it). The table is bitsandbytes' float32
    # one, which its kernels hard-code; checkpoints hold the 4-bit indices.
    QDType.nf4: CodeSpec(4, False, -1.0, 1.0, torch.uint8, None, None, None, table=(
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)),
    # bitsandbytes' FP4: E2M1 scaled to [-1, 1] but with its own smallest magnitude (1/192, not
    # 1/12), in bitsandbytes' code order (a sign bit, then magnitudes out of order; code 8 is -0,
    # chosen only at the tie between -0 and 1/192). Checkpoints hold these codes.
    QDType.bnb_fp4: CodeSpec(4, False, -1.0, 1.0, torch.uint8, None, None, None, table=(
        0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
        -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204,
        -0.25)),
    # MX elements with 4 and 6 bits are codes of their table (Quark's code order); MXFP8's are
    # E4M3FN values, as fp8_e4m3fn's. No ONNX type holds them with their E8M0 block scales.
    QDType.mxfp4: CodeSpec(4, False, -6.0, 6.0, torch.uint8, None, None, None, table=_mx_table(2, 1),
                           mx_element=(2, 1)),
    QDType.mxfp6_e2m3: CodeSpec(6, False, -7.5, 7.5, torch.uint8, None, None, None, table=_mx_table(2, 3),
                                mx_element=(2, 3)),
    QDType.mxfp6_e3m2: CodeSpec(6, False, -28.0, 28.0, torch.uint8, None, None, None, table=_mx_table(3, 2),
                                mx_element=(3, 2)),
    QDType.mxfp8: CodeSpec(8, True, -448.0, 448.0, torch.float8_e4m3fn, None, None, torch.float8_e4m3fn,
                           min_exponent=-6, mx_element=(4, 3)),
}


def _dynamic_map() -> tuple[float, ...]:
    """The signed 8-bit dynamic map (Dettmers, arXiv:1511.04561), as bitsandbytes builds it in
    float32: for each decade 10**e (e = -6 ... 0), the 2**(e+6) midpoints of 2**(e+6) + 1 points
    spread evenly over [0.1, 1], with both signs; then 0 and 1. Ascending, 256 entries."""
    values = [0.0, 1.0]
    for e in range(-6, 1):
        points = torch.linspace(0.1, 1, 2 ** (e + 6) + 1, dtype=torch.float32)
        mids = (points[:-1] + points[1:]) / 2.0
        values += (10**e * mids).tolist() + (-(10**e) * mids).tolist()
    return tuple(sorted(values))


@dataclasses.dataclass(frozen=True)
class NestedScales:
    """Double quantization (`double_quant`): a weight's per-group scales, less their mean (the
    offset), coded with `table` in blocks of `block` scales, each block with a float32 absmax.
    bitsandbytes' `compress_statistics`: 8-bit dynamic codes, blocks of 256."""

    block: int
    table: tuple[float, ...]


NESTED_SCALES = NestedScales(block=256, table=_dynamic_map())


class Granularity(str, enum.Enum):
    per_tensor = "per_tensor"
    per_channel = "per_channel"  # weights: one scale per output row
    # weights: groups of `group_size` along the input (K) axis; MX inputs: dynamic blocks of the last axis
    per_group = "per_group"
    per_token = "per_token"  # activations: dynamic, one scale per row, no observer


class ScaleDType(str, enum.Enum):
    """The dtype a layout stores a tensor's scales in. Scales are computed in float32 and rounded
    to it before any code is chosen, so the codes are the ones the stored scales produce."""

    float32 = "float32"
    float16 = "float16"  # GPTQ's scales
    # float32 absmax, scale x qmax (bitsandbytes' SCB and 4-bit absmax): the checkpoint holds
    # fl(scale * qmax) and a reader takes fl(absmax / qmax) back
    float32_absmax = "float32_absmax"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self is ScaleDType.float16 else torch.float32

    def representable(self, scale: torch.Tensor, qmax: float) -> torch.Tensor:
        """float32 `scale` rounded to the nearest value this dtype holds; positive scales stay
        positive (float16's smallest subnormal, 2**-24, is the floor). For an absmax, the scale
        its own round trip gives: one round trip more changes no scale (a test checks it)."""
        if self is ScaleDType.float32:
            return scale
        if self is ScaleDType.float32_absmax:
            return scale.mul(qmax).div(qmax)
        return scale.clamp(min=2.0**-24, max=65504.0).to(self.torch_dtype).float()


class ObserverKind(str, enum.Enum):
    minmax = "minmax"
    moving_average = "moving_average"
    percentile = "percentile"
    mse = "mse"
    histogram = "histogram"


@dataclasses.dataclass(frozen=True)
class TensorFormat:
    dtype: QDType
    granularity: Granularity
    symmetric: bool = True
    group_size: int = 0
    observer: ObserverKind | None = ObserverKind.minmax  # None: dynamic, nothing to observe
    reduce_range: bool = False  # int8 weights in 7 bits, -64..63 (see the spec field)
    scale_dtype: ScaleDType = ScaleDType.float32  # set by the output layout (runtime.layouts)
    double_quant: bool = False  # per-group scales coded as NESTED_SCALES (see the spec field)
    # per_token int8 inputs: columns holding a value of this magnitude or more stay in float
    # (LLM.int8); 0 keeps every column quantized
    outlier_threshold: float = 0.0

    @property
    def qmin(self) -> float:
        return -64 if self.reduce_range else self.dtype.qmin

    @property
    def qmax(self) -> float:
        return 63 if self.reduce_range else self.dtype.qmax

    @property
    def dynamic(self) -> bool:
        """Scales computed at run time: per_token, and per_group activations (MX blocks), which
        have no observer."""
        return self.granularity is Granularity.per_token or (
            self.granularity is Granularity.per_group and self.observer is None)

    def describe(self) -> str:
        text = f"{self.dtype.value} {self.granularity.value}"
        if self.group_size:
            text += f"(g{self.group_size})"
        text += " sym" if self.symmetric else " asym"
        if self.observer is not None:
            text += f" {self.observer.value}"
        elif self.granularity is Granularity.per_group:
            text += " dynamic"
        if self.reduce_range:
            text += " 7-bit"
        if self.scale_dtype is not ScaleDType.float32:
            text += f" {self.scale_dtype.value} scales"
        if self.double_quant:
            text += " double-quantized scales"
        if self.outlier_threshold:
            text += f" outliers >= {self.outlier_threshold:g} in float"
        return text

    def representable_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` as the layout stores it (`scale_dtype`), before any code is chosen."""
        return self.scale_dtype.representable(scale, self.qmax)

    def to_json(self) -> dict:
        return {"dtype": self.dtype.value, "granularity": self.granularity.value,
                "symmetric": self.symmetric, "group_size": self.group_size,
                "observer": None if self.observer is None else self.observer.value,
                **({"reduce_range": True} if self.reduce_range else {}),
                **({"scale_dtype": self.scale_dtype.value} if self.scale_dtype is not ScaleDType.float32 else {}),
                **({"double_quant": True} if self.double_quant else {}),
                **({"outlier_threshold": self.outlier_threshold} if self.outlier_threshold else {})}

    @classmethod
    def from_json(cls, data: dict) -> "TensorFormat":
        observer = data.get("observer")
        return cls(dtype=QDType(data["dtype"]), granularity=Granularity(data["granularity"]),
                   symmetric=bool(data["symmetric"]), group_size=int(data.get("group_size", 0)),
                   observer=None if observer is None else ObserverKind(observer),
                   reduce_range=bool(data.get("reduce_range", False)),
                   scale_dtype=ScaleDType(data.get("scale_dtype", "float32")),
                   double_quant=bool(data.get("double_quant", False)),
                   outlier_threshold=float(data.get("outlier_threshold", 0.0)))


@dataclasses.dataclass(frozen=True)
class LayerFormat:
    """How one linear layer is quantized. `None` leaves that tensor in float."""

    weight: TensorFormat | None = None
    input: TensorFormat | None = None
    output: TensorFormat | None = None

    @property
    def tensors(self) -> dict[str, TensorFormat]:
        return {k: v for k, v in (("weight", self.weight), ("input", self.input),
                                  ("output", self.output)) if v is not None}

    def to_json(self) -> dict:
        return {k: (None if v is None else v.to_json()) for k, v in
                (("weight", self.weight), ("input", self.input), ("output", self.output))}

    @classmethod
    def from_json(cls, data: dict) -> "LayerFormat":
        return cls(**{k: None if data.get(k) is None else TensorFormat.from_json(data[k])
                      for k in ("weight", "input", "output")})


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """One planned layer: its module path, resolved formats and the spec rules behind them.

    `annotate` puts it on the layer's linear node; the artifact's manifest records it.
    `algorithm` is the weight algorithm a rule chose for the layer ("rtn" keeps it out of the
    spec's weight algorithm); None leaves it to whichever runs."""

    module: str
    fmt: LayerFormat
    rules: tuple[str, ...]
    algorithm: str | None = None


def format_problem(fmt: LayerFormat) -> str | None:
    """Why the loader cannot run `fmt` (a manifest's layer format), or None. The spec refuses these
    at build time; a manifest is read back from disk, so they are checked again."""
    if not fmt.tensors:
        return "it quantizes nothing"
    for role, tf in fmt.tensors.items():
        per_group = tf.granularity is Granularity.per_group
        if tf.group_size < 0 or per_group != (tf.group_size > 0):
            return f"{role} has group_size {tf.group_size} with granularity {tf.granularity.value}"
        if tf.dtype.is_mx and (not per_group or tf.group_size != MX_BLOCK or not tf.symmetric):
            return f"{role} is {tf.describe()}; MX formats are symmetric per_group with group_size {MX_BLOCK}"
        if role == "weight":
            if tf.dynamic:
                return f"weight is {tf.describe()}: dynamic, which is for activations"
            if tf.dtype.bits == 4 and not per_group:
                return f"weight is {tf.dtype.value} {tf.granularity.value}; 4-bit weights are stored per_group"
        elif tf.dtype.is_mx:
            if role != "input" or not tf.dynamic:
                return f"{role} is {tf.describe()}; MX activations are dynamic inputs"
        elif tf.dtype.bits < 8 or tf.granularity in (Granularity.per_channel, Granularity.per_group):
            return f"{role} is {tf.dtype.value} {tf.granularity.value}; activations are 8-bit per_tensor or per_token"
        if tf.reduce_range and (role != "weight" or tf.dtype is not QDType.int8):
            return f"{role} has reduce_range, which applies to int8 weights only"
        if tf.outlier_threshold and (role != "input" or not tf.dynamic or tf.dtype is not QDType.int8
                                     or not tf.outlier_threshold > 0):
            return f"{role} is {tf.describe()}; outlier columns apply to per_token int8 inputs only"
        if tf.double_quant and (role != "weight" or not per_group):
            return f"{role} is {tf.describe()}; double quantization codes the scales of per_group weights only"
    return None
