"""qfx.runtime: what a deployment needs to run a qfx artifact, without the compiler."""
from qfx.runtime import ops  # noqa: F401  (registers the qfx:: ops)
from qfx.runtime.formats import Granularity, LayerFormat, QDType, TensorFormat
from qfx.runtime.loader import load
from qfx.runtime.program import load_program

__all__ = ["Granularity", "LayerFormat", "QDType", "TensorFormat", "load", "load_program"]
