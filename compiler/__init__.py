"""qfx: a declarative graph compiler for post-training quantization (AMD GPUs, ONNX Runtime)."""
__version__ = "0.1.0"

from qfx.build import CompileResult, compile  # noqa: E402,A004
from qfx.errors import QfxError, SpecError, UserError  # noqa: E402
from qfx.spec import Spec  # noqa: E402
from qfx.spec_loader import load_spec  # noqa: E402

__all__ = ["CompileResult", "QfxError", "Spec", "SpecError", "UserError", "compile", "load_spec",
           "__version__"]
