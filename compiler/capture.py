"""Load a model (Hugging Face directory or factory) and capture it with torch.export."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import traceback
from pathlib import Path

import torch

import qfx.lowering
import qfx.passes
import qfx.runtime
from qfx.errors import ExportError, ModelLoadError
from qfx.spec import ModelSource

ROOT = "hf"  # attribute under which a Hugging Face model sits in its export wrapper


class CausalLMLogits(torch.nn.Module):
    """A causal LM as a function of token ids to logits (no KV cache), for export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


class EncoderHidden(torch.nn.Module):
    """An encoder (BERT-like) as a function of ids and mask to the last hidden state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@dataclasses.dataclass
class ModelBundle:
    """A model ready for capture: the module to export and what qfx needs to know about it."""

    module: torch.nn.Module
    kind: str  # "causal_lm" | "encoder" | "module"
    root_prefix: str  # module-path prefix of the wrapper ("hf." or "")
    hf_model: torch.nn.Module | None = None
    model_dir: Path | None = None
    example_inputs: tuple | None = None  # factory models only
    vocab_size: int | None = None
    factory: str | None = None  # "package.module:function" when the model came from one



def _hf_kind(config, model: torch.nn.Module | None = None) -> str:
    names = list(getattr(config, "architectures", None) or []) + ([type(model).__name__] if model else [])
    return "causal_lm" if any(a.endswith("ForCausalLM") for a in names) else "encoder"


def load_hf(model_dir: Path) -> ModelBundle:
    import transformers

    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir}",
                             hint="model.path must be a local Hugging Face directory (config.json + weights); "
                                  "relative paths are relative to the spec file")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json, so it is not a Hugging Face model directory")
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        kind = _hf_kind(config)
        auto = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModel
        model = auto.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"transformers could not load {model_dir}: {str(exc).splitlines()[0]}") from None
    model.eval()
    wrapper = CausalLMLogits(model) if kind == "causal_lm" else EncoderHidden(model)
    return ModelBundle(wrapper, kind, ROOT + ".", model, model_dir,
                       vocab_size=getattr(config, "vocab_size", None))


def wrap_module(obj) -> ModelBundle:
    """A user's model (from a factory or qfx.compile): HF models get their wrapper."""
    model, example = (obj if isinstance(obj, tuple) else (obj, None))
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"expected a torch.nn.Module (or (module, example_inputs)), got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "get_input_embeddings") and example is None:
        kind = _hf_kind(config, model)
        wrapper = CausalLMLogits(model) if kind == "causal_lm" else EncoderHidden(model)
        model.eval()
        return ModelBundle(wrapper, kind, ROOT + ".", model, None, vocab_size=getattr(config, "vocab_size", None))
    if example is None:
        raise ModelLoadError(f"{type(model).__name__} is not a Hugging Face model, so qfx needs example inputs",
                             hint="return (model, example_inputs) from the factory, or pass example_inputs=")
    example = example if isinstance(example, tuple) else (example,)
    model.eval()
    return ModelBundle(model, "module", "", None, None, example_inputs=example)


def load_factory(reference: str) -> ModelBundle:
    module_name, _, func_name = reference.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import factory {reference!r}: {exc}",
                             hint="the module must be importable (on PYTHONPATH) and define the function") from None
    return dataclasses.replace(wrap_module(func()), factory=reference)


def load_model(source: ModelSource) -> ModelBundle:
    return load_hf(Path(source.path)) if source.path else load_factory(source.factory)


@contextlib.contextmanager
def _module_stack(root: torch.nn.Module):
    """Track which module is running, so an export failure can name it."""
    names = {id(m): n for n, m in root.named_modules()}
    stack: list[str] = []

    def pre(module, args):
        stack.append(f"{names.get(id(module)) or '<root>'} ({type(module).__name__})")

    def post(module, args, output):
        if stack:
            stack.pop()

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post)
    try:
        yield stack
    finally:
        h1.remove()
        h2.remove()


# Frames in these folders are torch's or qfx's own, never the line of the model that broke.
_LIBRARY_DIRS = tuple(str(Path(m.__file__).resolve().parent) + "/"
                      for m in (torch, qfx.passes, qfx.lowering, qfx.runtime)) + (str(Path(__file__).parent.resolve()) + "/",)


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and qfx: usually the model line that broke."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(_LIBRARY_DIRS)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def dynamic_dims(t, kind: str) -> dict | None:
    """Dim.AUTO keeps batch (and an HF model's sequence) dynamic within whatever bounds the
    model's own code implies (e.g. BERT's position table), instead of failing on a guessed maximum."""
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return None
    if kind != "module" and t.ndim >= 2:
        return {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    return {0: torch.export.Dim.AUTO}


def export(bundle: ModelBundle, example: tuple) -> torch.fx.GraphModule:
    """torch.export (non-strict) with dynamic batch (and sequence for HF models), unlifted."""
    dynamic = tuple(dynamic_dims(t, bundle.kind) for t in example)
    with _module_stack(bundle.module) as stack:
        try:
            program = torch.export.export(bundle.module, example, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # export raises many types; all become one clear error
            where = stack[-1] if stack else type(bundle.module).__name__
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            frame = _user_frame(exc)
            raise ExportError(
                f"torch.export failed in module {where}: {type(exc).__name__}: {first}"
                + (f"\n  at {frame}" if frame else ""),
                hint="qfx captures the model with torch.export (non-strict); data-dependent Python "
                     "control flow, .item()/.tolist() on tensors and in-place global state break it. "
                     "Make that code shape-only, or exclude the model part that does it") from None
    return program.module()
