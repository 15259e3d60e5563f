"""ONNX Runtime sessions for qfx's ONNX artifacts, set up so their numbers match torch's.

Providers go in AMD's order: MIGraphX (ORT 1.23 and later), ROCm (up to ORT 1.22), then CPU.
On the CPU provider, int4 DequantizeLinear -> MatMul fuses into MatMulNBits, which by default
computes at accuracy level 4 (int8 activations, about 6e-3 error); level 0 keeps it exact.
"""
from __future__ import annotations

from pathlib import Path

from qfx.runtime.errors import ArtifactError, UserError

PROVIDERS = ("MIGraphXExecutionProvider", "ROCMExecutionProvider", "CPUExecutionProvider")
EXACT_CPU_OPTIONS = {"session.qdq_matmulnbits_accuracy_level": "0"}


class ProviderError(UserError):
    pass


# What writing and checking an ONNX artifact imports (the `onnx` extra): the exporter's
# onnxscript and onnx_ir, onnx itself, ONNX Runtime for verify, ml_dtypes for int4 and FP8.
ONNX_MODULES = ("onnx", "onnx_ir", "onnxscript", "onnxruntime", "ml_dtypes")


def require_onnx(purpose: str) -> None:
    """Fail with what to install when the `onnx` extra is missing, before any work is done."""
    import importlib

    missing = []
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"{purpose} needs the Python packages {', '.join(missing)}, which are not installed",
                        hint="pip install 'qfx[onnx]' (make setup installs it), or drop onnx from output.formats")


def providers(requested: list[str] | None = None) -> list[str]:
    """The providers a session uses: `requested` (each must be installed), else every
    installed one of MIGraphX, ROCm, CPU in that order."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ProviderError(f"ONNX Runtime provider {', '.join(missing)} is not installed "
                                f"(this onnxruntime has {', '.join(available)})",
                                hint="MIGraphX ships in onnxruntime-migraphx (ORT 1.23+), ROCm in "
                                     "onnxruntime-rocm (up to ORT 1.22); or ask for CPUExecutionProvider")
        return list(requested)
    return [p for p in PROVIDERS if p in available]


# ONNX Runtime up to 1.22 (the last with the ROCm provider) fuses every QDQ -> MatMul into
# MatMulIntegerToFloat, an integer-only op, FP8 included, and then rejects its own graph
# ("Type 'tensor(float8e4m3fn)' of input parameter ... of operator (MatMulIntegerToFloat) ... is
# invalid"). Turning the QDQ fusions off keeps FP8 models valid; from 1.23 on it is not needed.
QDQ_FUSION_FIXED_IN = (1, 23)
NO_QDQ_FUSION = {"session.disable_quant_qdq": "1"}


def session_options(extra: dict[str, str] | None = None):
    """The options qfx opens its models with: exact CPU kernels, errors-only logging, and `extra`
    session config entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in {**EXACT_CPU_OPTIONS, **(extra or {})}.items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    return options


def ort_version() -> tuple[int, int]:
    import onnxruntime as ort

    major, minor = ort.__version__.split(".")[:2]
    return int(major), int(minor)


def session(model: Path | bytes, requested: list[str] | None = None):
    """An InferenceSession for a model file (or serialized model bytes).

    Decided by version, then by a probe: on ONNX Runtime before 1.23 a model whose QDQ fusion
    the runtime itself rejects as an FP8 graph is reopened with the QDQ fusions off, so only FP8
    models lose them (integer models keep their fused kernels)."""
    import onnxruntime as ort

    if not isinstance(model, bytes) and not Path(model).is_file():
        raise ArtifactError(f"{model} does not exist", hint="build with output.formats: [safetensors, onnx]")
    source = model if isinstance(model, bytes) else str(model)
    chosen = providers(requested)
    try:
        return ort.InferenceSession(source, session_options(), providers=chosen)
    except Exception as exc:  # ORT raises its own pybind exception types, which differ by version
        if ort_version() >= QDQ_FUSION_FIXED_IN or "float8" not in str(exc):
            raise
    return ort.InferenceSession(source, session_options(NO_QDQ_FUSION), providers=chosen)
