"""qfx.lowering: from a frozen QDQ graph to artifacts (safetensors, manifest, report)."""
from qfx.lowering.atomic import AtomicDir, made_by_qfx
from qfx.lowering.emit import emit_artifact, write_model_file
from qfx.lowering.manifest import write_manifest

__all__ = ["AtomicDir", "emit_artifact", "made_by_qfx", "write_manifest", "write_model_file"]
