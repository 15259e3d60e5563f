"""The spec: what to quantize and how, as frozen pydantic models (data only).

Rule semantics: `exclude` always wins; `default` gives every linear layer its scheme; each
rule whose `match` globs hit a layer overlays the fields it sets, in file order, later over
earlier; `null` switches a tensor off. Patterns are fnmatch globs on the module path
(`model.layers.0.self_attn.k_proj`), and a pattern that matches nothing is an error.
"""
from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from qfx.runtime.formats import MX_BLOCK, Granularity, ObserverKind, QDType


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class DType(str, enum.Enum):
    int8 = "int8"
    uint8 = "uint8"
    int4 = "int4"
    uint4 = "uint4"
    # weight-only widths in between (compressed-tensors layout; gptq at 2 bits)
    int2, uint2, int3, uint3 = "int2", "uint2", "int3", "uint3"
    int5, uint5, int6, uint6, int7, uint7 = "int5", "uint5", "int6", "uint6", "int7", "uint7"
    fp8_e4m3 = "fp8_e4m3"  # E4M3FNUZ on gfx942, OCP E4M3FN elsewhere
    nf4 = "nf4"  # NormalFloat4 weights (bitsandbytes, QLoRA), per_group: the group's absmax is its scale
    bnb_fp4 = "bnb_fp4"  # bitsandbytes' FP4 weights (its quant_type fp4), per_group like nf4
    # OCP MX (MI350 / gfx950): per_group with group_size 32 and an E8M0 scale each; weights, and
    # inputs quantized at run time
    mxfp4, mxfp6_e2m3, mxfp6_e3m2, mxfp8 = "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8"

    @property
    def is_mx(self) -> bool:
        return self is not DType.fp8_e4m3 and QDType(self.value).is_mx


class Target(str, enum.Enum):
    gfx942 = "gfx942"  # MI300: FP8 is E4M3FNUZ
    gfx950 = "gfx950"  # MI350: OCP E4M3FN
    cpu = "cpu"


class Preset(str, enum.Enum):
    w8a8_int8 = "w8a8-int8"
    w8a8_int8_dynamic = "w8a8-int8-dynamic"
    w8a8_fp8 = "w8a8-fp8"
    w8a16_int8 = "w8a16-int8"
    w4a16_g32 = "w4a16-g32"
    w4a16_g64 = "w4a16-g64"
    w4a16_g128 = "w4a16-g128"
    w4a16_g128_asym = "w4a16-g128-asym"
    llm_int8 = "llm-int8"
    w4a4_mxfp4 = "w4a4-mxfp4"
    w6a6_mxfp6_e2m3 = "w6a6-mxfp6-e2m3"
    w6a6_mxfp6_e3m2 = "w6a6-mxfp6-e3m2"
    w8a8_mxfp8 = "w8a8-mxfp8"


class TensorScheme(_Model):
    dtype: DType
    granularity: Granularity = Granularity.per_tensor
    group_size: int | None = Field(default=None, ge=2, description="elements per group along K (per_group)")
    symmetric: bool = True
    observer: ObserverKind | None = Field(
        default=None, description="range estimator: activations minmax (default), moving_average, percentile, "
                                  "mse (the min-max range shrunk to the least output error of the linears that "
                                  "read it, on sampled calibration rows; elsewhere to the least quantization error "
                                  "on a histogram of the calibration data) or histogram (each end narrowed on its own, greedily, "
                                  "as torch's HistogramObserver; per_token and MX inputs take none); weights minmax (default) "
                                  "or mse (each channel or group clipped to its least squared error)")
    reduce_range: bool = Field(
        default=False, description="int8 weights in 7 bits (-64..63): ONNX Runtime's fast uint8 x int8 "
                                   "kernels are then exact on x86 CPUs without VNNI; costs about 6 dB of weight SQNR")
    double_quant: bool = Field(
        default=False, description="per_group weights: their scales, less their mean, coded in 8 bits (a dynamic "
                                   "map) in blocks of 256 with a float32 absmax each: bitsandbytes' "
                                   "bnb_4bit_use_double_quant (output.layout: bitsandbytes)")
    outlier_threshold: float | None = Field(
        default=None, gt=0, description="per_token int8 inputs (LLM.int8): the columns holding a value of this "
                                        "magnitude or more stay in float, the rest are quantized (bitsandbytes' "
                                        "llm_int8_threshold, 6.0 in preset llm-int8)")

    @model_validator(mode="after")
    def _consistent(self):
        g = self.granularity
        if self.dtype.is_mx and (g is not Granularity.per_group or self.group_size != MX_BLOCK):
            raise ValueError(f"{self.dtype.value} shares one E8M0 scale per {MX_BLOCK} elements: set granularity: "
                             f"per_group, group_size: {MX_BLOCK}"
                             + (f" (not {self.group_size})" if self.group_size is not None else ""))
        if g is Granularity.per_group and self.group_size is None:
            raise ValueError("per_group needs group_size (e.g. 32, 64, 128)")
        if g is not Granularity.per_group and self.group_size is not None:
            raise ValueError(f"group_size applies to per_group only, not {g.value}")
        if g is Granularity.per_token and self.observer is not None:
            raise ValueError("per_token is dynamic (scales computed at run time); remove `observer`")
        if self.dtype.value.startswith("uint") and self.symmetric:
            raise ValueError(f"{self.dtype.value} is unsigned, so asymmetric: set symmetric: false")
        if (self.dtype in (DType.fp8_e4m3, DType.nf4, DType.bnb_fp4) or self.dtype.is_mx) and not self.symmetric:
            raise ValueError(f"{self.dtype.value} has no zero point: it is symmetric only")
        if self.reduce_range and self.dtype is not DType.int8:
            raise ValueError(f"reduce_range applies to int8 weights, not {self.dtype.value}")
        if self.outlier_threshold is not None and (g is not Granularity.per_token or self.dtype is not DType.int8):
            raise ValueError(f"outlier_threshold keeps outlier columns of per_token int8 inputs in float; this is "
                             f"{self.dtype.value} {g.value}: use dtype int8, granularity per_token")
        if self.double_quant and self.dtype.is_mx:
            raise ValueError(f"{self.dtype.value} scales are E8M0 exponents, one byte each already: drop double_quant")
        if self.double_quant and g is not Granularity.per_group:
            raise ValueError(f"double_quant codes the scales of per_group weights; {g.value} has no groups of "
                             "scales to code: use per_group, or drop double_quant")
        return self


class TensorPatch(_Model):
    """A rule's partial tensor scheme: the fields it sets overlay the scheme it applies to."""

    dtype: DType | None = None
    granularity: Granularity | None = None
    group_size: int | None = Field(default=None, ge=2)
    symmetric: bool | None = None
    observer: ObserverKind | None = None
    reduce_range: bool | None = None
    double_quant: bool | None = None
    outlier_threshold: float | None = Field(default=None, gt=0)


class LayerScheme(_Model):
    """`default`: overlays the preset (if any) field by field; complete schemes are checked per layer."""

    weight: TensorPatch | None = None
    input: TensorPatch | None = None
    output: TensorPatch | None = None


class Rule(_Model):
    match: list[str] = Field(min_length=1, description="fnmatch globs on module paths")
    weight: TensorPatch | None = None
    input: TensorPatch | None = None
    output: TensorPatch | None = None
    algorithm: Literal["rtn", "gptq", "awq", "hqq"] | None = Field(
        default=None, description="the weight algorithm of the matched layers: rtn rounds them to nearest; "
                                  "gptq, awq or hqq must be the one `algorithms` lists (later rules over earlier)")

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


class Quantization(_Model):
    preset: Preset | None = None
    default: LayerScheme | None = None
    rules: list[Rule] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)

    @field_validator("exclude", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _has_scheme(self):
        if self.preset is None and self.default is None and not self.rules:
            raise ValueError("give a `preset`, a `default` scheme, or `rules`")
        for role, fields in self.default_fields().items():
            if fields is None:
                continue
            try:
                scheme = TensorScheme.model_validate(fields)
            except ValueError as exc:
                problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise ValueError(f"default.{role}: {problems}") from None
            if problem := role_problem(role, scheme):
                raise ValueError(f"default.{role}: {problem}")
        return self

    def default_fields(self) -> dict[str, dict | None]:
        """The default scheme per role: the preset's, overlaid field by field by `default`."""
        from qfx.presets import PRESETS

        base = {role: None for role in ROLES}
        if self.preset is not None:
            base.update(PRESETS[self.preset])
        if self.default is not None:
            for role in self.default.model_fields_set & set(ROLES):
                base[role] = overlay(base[role], getattr(self.default, role), role)
        return base


ROLES = ("weight", "input", "output")


def overlay(base: dict | None, patch: "TensorPatch | None", role: str) -> dict | None:
    """A rule or default's fields over a scheme; `None` (null in YAML) switches the tensor off.

    A patch that changes the granularity drops the inherited fields the new granularity does
    not take (a preset's group_size under `granularity: per_channel`, its observer under
    per_token or MX inputs): the user cannot unset an inherited field, so keeping it would make the rule
    unwritable. A field the patch itself sets is kept, and the scheme check still judges it."""
    if patch is None:
        return None
    fields = patch.model_dump(exclude_unset=True)
    merged = {**(base or {}), **fields}
    if fields.get("granularity") is not None:
        granularity = Granularity(fields["granularity"])
        for name in set(merged) - set(fields):
            if not takes_field(granularity, name, role):
                del merged[name]
    return merged


def takes_field(granularity: Granularity, name: str, role: str) -> bool:
    """Whether a `role` tensor's scheme of `granularity` may set `name` (as TensorScheme._consistent
    and role_problem check)."""
    if name == "double_quant":
        return granularity is Granularity.per_group and role == "weight"
    if name == "group_size":
        return granularity is Granularity.per_group
    if name == "outlier_threshold":
        return granularity is Granularity.per_token
    if name == "observer":  # dynamic activations (per_token, MX per_group inputs) have none
        return granularity is not Granularity.per_token and (role == "weight" or granularity is not Granularity.per_group)
    return True


def _path_text(value: str) -> str:
    """A file path the OS can be asked about: no NUL byte, encodable as UTF-8 (YAML escapes can
    write both, and the OS call would otherwise fail deep inside the build)."""
    if "\x00" in value:
        raise ValueError("a path cannot contain a NUL character (\\0)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"a path must be valid Unicode text ({exc.reason} at character {exc.start})") from None
    return value


PathText = Annotated[str, AfterValidator(_path_text)]


class ModelSource(_Model):
    path: PathText | None = Field(default=None, description="a local Hugging Face model directory")
    factory: str | None = Field(default=None, description="'package.module:function' returning a model "
                                "or (model, example_inputs)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.factory is None):
            raise ValueError("give exactly one of `path` or `factory`")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError("factory must look like 'package.module:function'")
        return self


class Calibration(_Model):
    text: PathText | None = Field(default=None, description="a UTF-8 text file, tokenized with the model's tokenizer")
    tokens: PathText | None = Field(default=None, description="a .safetensors or .npy file of token ids; a 2-D "
                                    "file gives samples and seq_len unless they are set")
    synthetic: bool = Field(default=False, description="random token ids (no data; for smoke tests)")
    samples: int = Field(default=16, ge=1)
    seq_len: int = Field(default=128, ge=2)
    batch_size: int = Field(default=8, ge=1)
    split: Literal["document", "lines"] | None = Field(
        default=None, description="document: the text as one token stream cut into samples (causal LMs); "
        "lines: one sample per non-empty line, padded (encoders). Default by model kind.")
    seed: int = Field(default=0, ge=-2**63, le=2**63 - 1, description="seed of synthetic ids (a 64-bit integer)")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("text", "tokens") if getattr(self, k) is not None] + (["synthetic"] if self.synthetic else [])
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, tokens or synthetic: true (got {given or 'none'})")
        return self


def _fraction(value):
    """A share written as a percent ("2%", any size) or as a fraction of at most 1 (0.02): a bare
    2 would be ambiguous between 2% and 200%."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100
        number = float(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a share: write a percent ('2%') or a fraction (0.02)") from None
    if number > 1:
        raise ValueError(f"{value!r} as a fraction is over 100%: write '{number:g}%' for a percent")
    return number


Fraction = Annotated[float, BeforeValidator(_fraction), Field(ge=0)]


class Budget(_Model):
    """What the quantized model must keep against the float one; each figure left out is measured,
    not judged. Causal LMs: perplexity_increase, logits_rel_error, top1_agreement; encoders:
    mean_cosine (and logits_rel_error of the last hidden state)."""

    perplexity_increase: Fraction | None = Field(
        default=None, description="the most the perplexity may rise, relative: '2%' or 0.02")
    logits_rel_error: float | None = Field(default=None, gt=0, description="the largest relative error of the outputs")
    top1_agreement: Fraction | None = Field(
        default=None, le=1, description="the least share of positions whose top-1 token is the float model's")
    mean_cosine: float | None = Field(default=None, ge=-1, le=1,
                                      description="encoders: the least mean cosine of mean-pooled outputs")

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Evaluate(_Model):
    """Data the build evaluates the quantized model on at its end, against the float model, and the
    budget it must keep: a build over budget exits with code 3 and does not publish its artifact."""

    text: PathText | None = Field(default=None, description="a UTF-8 text file: one token stream (causal LMs) "
                                  "or one sample per non-empty line (encoders)")
    tokens: PathText | None = Field(default=None, description="a .safetensors or .npy file of token ids")
    seq_len: int = Field(default=256, ge=2, description="tokens per window (causal LMs) or per line (encoders)")
    max_tokens: int | None = Field(default=None, ge=2, description="causal LMs: use only the first N tokens")
    max_lines: int | None = Field(default=None, ge=1, description="encoders: use only the first N lines")
    budget: Budget = Field(default_factory=Budget)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.text is None) == (self.tokens is None):
            raise ValueError("give exactly one of text or tokens")
        return self


class OutputFormat(str, enum.Enum):
    safetensors = "safetensors"  # in output.layout, + config.json: transformers and vLLM
    onnx = "onnx"  # QDQ at opset 21: ONNX Runtime (MIGraphX, ROCm and CPU execution providers)
    program = "program"  # model.pt2: the lowered torch.export program (fused ops; qfx.runtime.load_program)


class CheckpointLayout(str, enum.Enum):
    """How model.safetensors and config.json store the quantized layers (qfx.runtime.layouts)."""

    quark = "quark"  # AMD Quark: transformers through amd-quark, vLLM quantization='quark'
    gptq = "gptq"  # GPTQ v1 (AutoGPTQ, GPTQModel): transformers through optimum + gptqmodel, vLLM
    gptq_v2 = "gptq_v2"  # GPTQ with true zero points: asymmetric weights
    compressed_tensors = "compressed-tensors"  # llm-compressor: transformers through compressed-tensors, vLLM
    bitsandbytes = "bitsandbytes"  # NF4 weights: transformers through bitsandbytes (load_in_4bit checkpoints)


class OnnxOptions(_Model):
    opset: Literal[21] = Field(default=21, description="ONNX opset; 21 is the first with blocked (int4) and FP8 QDQ")
    verify: bool = Field(default=True, description="check the ONNX model against the safetensors artifact after the build")


class Output(_Model):
    dir: PathText
    force: bool = Field(default=False, description="replace an existing directory that qfx did not write")
    formats: list[OutputFormat] = Field(default_factory=lambda: [OutputFormat.safetensors], min_length=1,
                                        description="artifacts to write; safetensors is always among them")
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    layout: CheckpointLayout = Field(default=CheckpointLayout.quark,
                                     description="the layout of model.safetensors and its config.json: quark, gptq "
                                                 "(weight-only int2/int4/int8, symmetric), gptq_v2 (also asymmetric), "
                                                 "compressed-tensors (int2-int8 weight-only, W8A8 int8, FP8) or "
                                                 "bitsandbytes (nf4 / bnb_fp4 weight-only)")

    @field_validator("formats")
    @classmethod
    def _safetensors_first(cls, formats: list[OutputFormat]) -> list[OutputFormat]:
        if OutputFormat.safetensors not in formats:
            raise ValueError("formats must include safetensors: the manifest, the runtime loader and "
                             "`qfx verify` read it (add onnx beside it)")
        return sorted(set(formats), key=list(OutputFormat).index)


class SmoothQuantOptions(_Model):
    alpha: float | Literal["auto"] = Field(
        default="auto", description="migration strength in (0, 1): s = max|X|^alpha / max|W|^(1-alpha); "
                                    "auto searches it per fold group on the calibration data")
    explicit_multiply: bool = Field(
        default=False, description="where no producer can absorb the factors (a LayerNorm that also feeds a "
                                   "residual, an activation between two linears), multiply the layer's input by "
                                   "them explicitly (a stored pre_quant_scale per layer): qfx.runtime and ONNX run "
                                   "it; Quark-format loaders such as vLLM's do not")

    @field_validator("alpha")
    @classmethod
    def _open_unit(cls, value):
        if value != "auto" and not 0 < value < 1:
            raise ValueError(f"alpha must be in (0, 1) or auto, got {value}")
        return value


class RotationOptions(_Model):
    kind: Literal["hadamard", "random"] = Field(
        default="hadamard", description="hadamard: a Hadamard matrix with random signs (orders 2^k·m, m = 1 or a "
                                        "Paley order such as 12, 20, 28); random: a random orthogonal matrix")
    seed: int = Field(default=0, ge=0, description="seed of the random signs or matrix")
    residual: bool = Field(default=True, description="rotate the residual stream (R1; RMSNorm models): false keeps "
                                                     "only the head rotation and the online Hadamard, for "
                                                     "LayerNorm models such as BERT")
    heads: bool = Field(default=True, description="also rotate each attention head between the value and "
                                                  "output projections (R2)")
    online_down_proj: bool = Field(default=False, description="an online Hadamard transform (qfx::hadamard) before "
                                   "each linear whose input other linears make through elementwise ops (the MLP's down projection, R4): the artifact then needs a runtime that runs "
                                   "it (qfx.runtime, ONNX); Quark-format loaders such as vLLM's do not")


class GptqOptions(_Model):
    damp: float = Field(default=0.01, ge=0, le=1, description="added to the Hessian's diagonal, relative to its "
                                                             "mean; raised tenfold (up to 1) where the Hessian is "
                                                             "not positive definite, and recorded per layer")
    block_size: int = Field(default=128, ge=1, description="columns updated together (speed only)")
    act_order: bool = Field(default=True, description="quantize the columns with the largest input energy first; "
                                                      "each keeps its group's scale (static groups), so the "
                                                      "layout needs no permutation index")
    sequential: bool = Field(default=True, description="each layer's Hessian from the activations of the model "
                                                       "whose earlier layers are already quantized; false: from "
                                                       "the float model's")


class AwqOptions(SmoothQuantOptions):
    """SmoothQuant's options (the same fold), with AWQ's scale rule and the clip search."""

    alpha: float | Literal["auto"] = Field(
        default="auto", description="strength in (0, 1): s = mean|X|^alpha per input channel; auto searches it "
                                    "per fold group on the calibration data")
    clip: bool = Field(default=True, description="then clip each group's range to its least output error on the "
                                                 "calibration rows")


class HqqOptions(_Model):
    iterations: int = Field(default=20, ge=1, le=1000, description="refits of each group's grid at most; the loop "
                                                                   "stops once one improves no group")
    lp_norm: float = Field(default=0.7, gt=0, le=1, description="p of the lp norm whose shrinkage separates a "
                                                                "group's outliers from what its grid fits")
    beta: float = Field(default=10.0, gt=0, description="strength of the shrinkage, in weight units: residuals "
                                                        "below beta^(-1/(2-p)) count fully in the fit")
    kappa: float = Field(default=1.01, ge=1, description="beta's growth per iteration")


class Algorithm(_Model):
    """One entry of `algorithms`: a mapping with a single key naming the algorithm."""

    rotation: RotationOptions | None = Field(
        default=None, description="rotate the residual stream (and attention heads) by an orthogonal matrix, "
                                  "folded exactly into the weights")
    smoothquant: SmoothQuantOptions | None = Field(
        default=None, description="SmoothQuant, folded exactly into the producers the graph's dataflow proves")
    gptq: GptqOptions | None = Field(
        default=None, description="GPTQ: integer weights rounded column by column, each column's error spread "
                                  "over the rest through the inverse Hessian of the layer's calibration inputs")
    awq: AwqOptions | None = Field(
        default=None, description="AWQ: input channels scaled by their mean activation before rounding (folded "
                                  "exactly, as SmoothQuant's), then each group's range clipped to its least "
                                  "output error on the calibration data")
    hqq: HqqOptions | None = Field(
        default=None, description="HQQ: each group's scale (and integer zero point) refitted to its weights by "
                                  "half-quadratic optimization; needs no calibration data")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value):
        if isinstance(value, str):  # `- smoothquant` means its defaults
            return {value: {}}
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _one_key(self):
        if len(self.model_fields_set) != 1:
            raise ValueError(f"each entry names one algorithm, e.g. {{smoothquant: {{alpha: auto}}}}; "
                             f"got {sorted(self.model_fields_set) or 'none'}")
        return self

    @property
    def name(self) -> str:
        return next(iter(self.model_fields_set))


# Algorithms that choose the weights' codes (the others transform the float model).
WEIGHT_ALGORITHMS = ("gptq", "awq", "hqq")


class Spec(_Model):
    version: Literal[1]
    model: ModelSource | None = Field(default=None, description="required unless qfx.compile is given a model")
    target: Target = Target.cpu
    # Left out, a spec calibrates on random ids; the build refuses that for trained checkpoints
    # (calib_data.calibration_set), so it must know whether the spec set it: model_fields_set.
    calibration: Calibration = Field(default_factory=lambda: Calibration(synthetic=True),
                                     description="required for trained checkpoints; default synthetic: true "
                                                 "for factory models")
    quantization: Quantization
    algorithms: list[Algorithm] = Field(default_factory=list, description="transforms run before "
                                        "quantization, in order, e.g. [{smoothquant: {alpha: auto}}]")
    evaluate: Evaluate | None = Field(default=None, description="evaluation data and an accuracy budget, "
                                      "judged at the end of the build")
    output: Output | None = None

    @field_validator("algorithms")
    @classmethod
    def _once_each(cls, algorithms: list[Algorithm]) -> list[Algorithm]:
        names = [a.name for a in algorithms]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"{', '.join(twice)} is listed more than once")
        if len(chosen := [n for n in names if n in WEIGHT_ALGORITHMS]) > 1:
            raise ValueError(f"{' and '.join(chosen)} both choose the weights' codes: list one of them")
        if "smoothquant" in names and "awq" in names:
            raise ValueError("smoothquant and awq both fold per-channel scales into the same producers: list one "
                             "(awq for weight-only builds, smoothquant where activations are quantized)")
        if "rotation" in names and "smoothquant" in names and names.index("smoothquant") < names.index("rotation"):
            raise ValueError("rotation must come before smoothquant: rotating fuses the norm weights, and the "
                             "smoothing folded into them, into the linears, where the rotation spreads it away")
        return algorithms


def spec_json_schema() -> dict[str, Any]:
    return Spec.model_json_schema()


def role_problem(role: str, scheme: TensorScheme) -> str | None:
    """Why `scheme` cannot quantize a layer's `role` tensor (weight, input, output), or None."""
    g = scheme.granularity
    if role == "weight":
        if g is Granularity.per_token:
            return "per_token is for activations; weights take per_tensor, per_channel or per_group"
        if scheme.observer not in (None, ObserverKind.minmax, ObserverKind.mse):
            return ("weights take their range from the tensor itself: use minmax, or mse (each channel or "
                    "group clipped to its least squared error)")
        return None
    if scheme.reduce_range:
        return "reduce_range applies to weights; activations keep the full int8 range"
    if scheme.dtype.is_mx:
        if role == "output":
            return f"{scheme.dtype.value} outputs are not supported; MX quantizes weights and inputs"
        if scheme.observer is not None:
            return f"{scheme.dtype.value} inputs are quantized at run time, each block by its own absmax: remove `observer`"
        return None
    if scheme.dtype not in (DType.int8, DType.uint8, DType.fp8_e4m3):
        return f"{scheme.dtype.value} activations are not supported; use int8 or fp8_e4m3, or null for weight-only"
    if g in (Granularity.per_channel, Granularity.per_group):
        return (f"{g.value} activations are not supported; use per_tensor (static) or per_token (dynamic), or an "
                "MX dtype (mxfp4, ...) per_group")
    if role == "output" and g is not Granularity.per_tensor:
        return "output (KV cache) quantization is static: use per_tensor"
    return None

