"""The Quark checkpoint: tensors and `quantization_config` as amd-quark's own exporter writes them,
which transformers (with amd-quark) and vLLM (`quantization='quark'`) load."""
from __future__ import annotations

import collections
import fnmatch

import torch

from qfx.runtime.formats import Granularity, LayerFormat, LayerQuant, ObserverKind, TensorFormat
from qfx.runtime.layout import layer_to_artifact

QUARK_VERSION = "0.13"
KV_PATTERNS = ("*k_proj", "*v_proj")

_OBSERVER_CLS = {Granularity.per_tensor: "PerTensorMinMaxObserver",
                 Granularity.per_channel: "PerChannelMinMaxObserver",
                 Granularity.per_group: "PerGroupMinMaxObserver",
                 Granularity.per_token: "PerChannelMinMaxObserver"}


def quark_tensor_config(fmt: TensorFormat | None, role: str) -> dict | None:
    if fmt is None:
        return None
    dynamic = fmt.dynamic
    if role == "weight":
        ch_axis = {Granularity.per_channel: 0, Granularity.per_group: -1}.get(fmt.granularity)
    else:
        ch_axis = 1 if dynamic else None
    observer = _OBSERVER_CLS[fmt.granularity]
    if fmt.observer is ObserverKind.percentile:
        observer = "PerTensorPercentileObserver"
    return {
        "dtype": "fp8_e4m3" if fmt.dtype.is_fp8 else fmt.dtype.value,
        "qscheme": "per_channel" if dynamic else fmt.granularity.value,
        "ch_axis": ch_axis,
        "group_size": fmt.group_size or None,
        "symmetric": fmt.symmetric,
        "is_dynamic": dynamic,
        "round_method": "half_even",
        "scale_type": "float",
        "zero_point_type": "int32",
        "observer_cls": observer,
        "block_size": None, "enable_buffer_reuse": False, "is_scale_quant": False,
        "mx_element_dtype": None, "scale_calculation_mode": None, "scale_format": None,
    }


def quark_layer_config(fmt: LayerFormat) -> dict:
    return {"weight": quark_tensor_config(fmt.weight, "weight"),
            "input_tensors": quark_tensor_config(fmt.input, "input"),
            "output_tensors": quark_tensor_config(fmt.output, "output"),
            "bias": None, "target_device": None}


def quantization_config(plan: dict[str, LayerQuant], linear_paths: list[str]) -> dict:
    """Quark's config: the most common layer format is global; other layers are listed by name."""
    counts = collections.Counter(q.fmt for q in plan.values())
    common = counts.most_common(1)[0][0] if counts else LayerFormat()
    kv_layers = sorted(p for p, q in plan.items() if q.fmt.output is not None)
    # vLLM looks the KV cache up by the kv_cache_group keys in layer_quant_config, so when every
    # k_proj (v_proj) shares one format the config says so under Quark's own pattern.
    by_pattern = {pat: {plan[p].fmt for p in plan if fnmatch.fnmatchcase(p, pat)} for pat in KV_PATTERNS}
    patterned = bool(kv_layers) and all(any(fnmatch.fnmatchcase(p, pat) for pat in KV_PATTERNS) for p in kv_layers) \
        and all(len(fmts) == 1 for fmts in by_pattern.values())
    if patterned:
        kv_config = {pat: quark_layer_config(next(iter(by_pattern[pat]))) for pat in KV_PATTERNS}
        covered = {p for p in plan if any(fnmatch.fnmatchcase(p, pat) for pat in KV_PATTERNS)}
    else:
        kv_config = {p: quark_layer_config(plan[p].fmt) for p in kv_layers}
        covered = set()
    layer_config = {p: quark_layer_config(q.fmt) for p, q in plan.items() if q.fmt != common and p not in covered}
    layer_config.update(kv_config)
    kv_group = list(kv_config)
    return {
        "quant_method": "quark",
        "quant_mode": "eager_mode",
        "version": QUARK_VERSION,
        "global_quant_config": quark_layer_config(common),
        "layer_quant_config": layer_config,
        "layer_type_quant_config": {},
        "kv_cache_quant_config": kv_config,
        "kv_cache_post_rope": False,
        "softmax_quant_spec": None,
        "algo_config": None,
        "exclude": [p for p in linear_paths if p not in plan],
        "export": {"kv_cache_group": kv_group, "min_kv_scale": 0.0, "pack_method": "reorder",
                   "weight_format": "real_quantized", "weight_merge_groups": None},
    }


def artifact_tensors(gm: torch.nn.Module, plan: dict[str, LayerQuant], root_prefix: str
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
        for k, v in layer_to_artifact(layer, quant.fmt).items():
            tensors[prefix + k] = v
    return {k: tensors[k].contiguous() for k in sorted(tensors)}, aliases
