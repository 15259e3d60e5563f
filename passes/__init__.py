"""qfx.passes: graph-to-graph transforms, one per file, listed in `registry.PASSES`."""
from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.registry import DEFAULT_PIPELINE, PASSES, format_pipeline, parse_pipeline

__all__ = ["DEFAULT_PIPELINE", "PASSES", "Pass", "PassContext", "PassResult", "format_pipeline",
           "parse_pipeline"]
