"""qfx's error types. Each says what went wrong, where, and how to fix it.

They live at the bottom of the import graph so every layer can raise them; `qfx.errors`
re-exports them. `exit_code` is what the CLI returns: 2 for bad input, 3 for a model over its
accuracy budget, 1 for a qfx fault.
"""
from __future__ import annotations


class QfxError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message, self.where, self.hint = message, where, hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class UserError(QfxError):
    """Bad input: a spec, a model, data or a path that qfx cannot use as given."""
    exit_code = 2


class SpecError(UserError):
    pass


class ModelLoadError(UserError):
    pass


class ExportError(UserError):
    pass


class CalibrationError(UserError):
    pass


class OutputError(UserError):
    pass


class ArtifactError(UserError):
    """An artifact directory that is missing files, or whose files disagree."""


class BudgetError(QfxError):
    """The quantized model is outside the accuracy budget its spec (or `qfx eval --budget`) sets."""
    exit_code = 3

    def __init__(self, message: str, *, figures: dict, where: str | None = None, hint: str | None = None):
        self.figures = figures
        super().__init__(message, where=where, hint=hint)


class PassFailure(QfxError):
    """A compiler pass raised or left a broken graph: a qfx fault, with a reproducer."""


class QfxWarning(UserWarning):
    """A build that succeeds with a consequence the user should know of (e.g. an artifact that
    some consumers cannot run)."""
