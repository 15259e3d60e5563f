"""The frozen graph's tensors under their model names, each quantized layer's as its layout stores them."""
from __future__ import annotations

import torch

from qfx.runtime.formats import LayerQuant
from qfx.runtime.layouts import Layout


def artifact_tensors(gm: torch.nn.Module, plan: dict[str, LayerQuant], root_prefix: str, layout: Layout
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of the frozen graph under their model names, in artifact form.

    Tensors that share storage (tied embeddings) are stored once, under the first name;
    the second return value maps each dropped alias to the name it shares."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in gm.state_dict(keep_vars=False).items():
        if not name.startswith(root_prefix):
            continue
        name = name[len(root_prefix):]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach()
    for path, quant in plan.items():
        prefix = path + "."
        layer = {k[len(prefix):]: v for k, v in tensors.items()
                 if k.startswith(prefix) and "." not in k[len(prefix):]}
        for k in layer:
            del tensors[prefix + k]
        for k, v in layout.to_artifact(layer, quant.fmt).items():
            tensors[prefix + k] = v
    return {k: tensors[k].contiguous() for k in sorted(tensors)}, aliases
