"""qfx's errors (defined in qfx.runtime.errors so the runtime can raise them without the compiler)."""
from qfx.runtime.errors import (
                                ArtifactError,
                                BudgetError,
                                CalibrationError,
                                ExportError,
                                ModelLoadError,
                                OutputError,
                                PassFailure,
                                QfxError,
                                QfxWarning,
                                SpecError,
                                UserError,
)

__all__ = ["ArtifactError", "BudgetError", "CalibrationError", "ExportError", "ModelLoadError", "OutputError",
           "PassFailure", "QfxError", "QfxWarning", "SpecError", "UserError"]
