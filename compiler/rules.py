"""Resolve the spec's default, rules and exclude into one frozen format per linear layer."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch

import pydantic

from qfx.errors import SpecError
from qfx.runtime.formats import Granularity, LayerFormat, LayerQuant, ObserverKind, QDType, TensorFormat
from qfx.runtime.layouts import Layout
from qfx.spec import ROLES, DType, Target, TensorScheme, overlay, role_problem
from qfx.spec_loader import SpecSource


@dataclasses.dataclass(frozen=True)
class LinearInfo:
    path: str
    in_features: int
    out_features: int


def nearest_names(pattern: str, paths: list[str], n: int = 5) -> list[str]:
    stem = pattern.strip("*?")
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    close = difflib.get_close_matches(stem, leaves, n=n, cutoff=0.5)
    hits = [next(p for p in paths if p.rsplit(".", 1)[-1] == leaf) for leaf in close]
    hits += [p for p in difflib.get_close_matches(pattern, paths, n=n, cutoff=0.5) if p not in hits]
    return hits[:n] or paths[:n]


def _unmatched(pattern: str, loc: tuple, source: SpecSource, paths: list[str]) -> SpecError:
    near = nearest_names(pattern, paths)
    return SpecError(f"pattern {pattern!r} matches no linear layer",
                     where=source.where(loc),
                     hint=f"nearest module names: {', '.join(near)}; patterns are fnmatch globs "
                          "on the full module path, e.g. '*k_proj'")


def to_format(scheme: TensorScheme, target: Target, role: str) -> TensorFormat:
    if scheme.dtype is DType.fp8_e4m3:
        dtype = QDType.fp8_e4m3fnuz if target is Target.gfx942 else QDType.fp8_e4m3fn
    else:
        dtype = QDType(scheme.dtype.value)
    # per_group activations (MX) are dynamic like per_token: scales taken at run time
    dynamic = scheme.granularity is Granularity.per_token or (
        role != "weight" and scheme.granularity is Granularity.per_group)
    observer = None if dynamic else (scheme.observer or ObserverKind.minmax)
    return TensorFormat(dtype=dtype, granularity=scheme.granularity, symmetric=scheme.symmetric,
                        group_size=scheme.group_size or 0, observer=observer, reduce_range=scheme.reduce_range,
                        double_quant=scheme.double_quant, outlier_threshold=scheme.outlier_threshold or 0.0)


LAYOUT_LOC = ("output", "layout")


def resolve_plan(quantization, target: Target, layers: list[LinearInfo], source: SpecSource, layout: Layout
                 ) -> dict[str, LayerQuant]:
    """Each planned layer's format, with weight scales in the dtype `layout` stores; a format or
    shape the layout cannot hold is a SpecError at the line that chose it."""
    paths = [layer.path for layer in layers]
    q_loc = ("quantization",)
    for i, pattern in enumerate(quantization.exclude):
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            raise _unmatched(pattern, q_loc + ("exclude", i), source, paths)
    for r, rule in enumerate(quantization.rules):
        for i, pattern in enumerate(rule.match):
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                raise _unmatched(pattern, q_loc + ("rules", r, "match", i), source, paths)

    base = quantization.default_fields()
    set_by_default = quantization.default.model_fields_set if quantization.default else set()
    base_origin = {role: q_loc + (("default", role) if role in set_by_default else ("preset",))
                   for role in ROLES}
    default_label = ["default"] if quantization.default else []
    if quantization.preset is not None:
        default_label.insert(0, f"preset {quantization.preset.value}")

    plan: dict[str, LayerQuant] = {}
    for layer in layers:
        if any(fnmatch.fnmatchcase(layer.path, p) for p in quantization.exclude):
            continue
        fields, origin, applied, algorithm = dict(base), dict(base_origin), list(default_label), None
        for r, rule in enumerate(quantization.rules):
            hit = next((p for p in rule.match if fnmatch.fnmatchcase(layer.path, p)), None)
            if hit is None:
                continue
            applied.append(f"rules[{r}] ({hit})")
            for role in rule.model_fields_set & set(ROLES):
                fields[role] = overlay(fields[role], getattr(rule, role), role)
                origin[role] = q_loc + ("rules", r, role)
            algorithm = rule.algorithm or algorithm
        formats = {}
        for role in ROLES:
            if fields[role] is None:
                formats[role] = None
                continue
            where = source.where(origin[role])
            try:
                scheme = TensorScheme.model_validate(fields[role])
            except pydantic.ValidationError as exc:
                problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise SpecError(f"{role} of {layer.path}: {problems}", where=where) from None
            if problem := role_problem(role, scheme):
                raise SpecError(f"{role} of {layer.path}: {problem}", where=where)
            if scheme.group_size and layer.in_features % scheme.group_size:
                raise SpecError(f"group_size {scheme.group_size} does not divide in_features "
                                f"{layer.in_features} of {layer.path}", where=where,
                                hint="exclude the layer (MX blocks are always 32)" if scheme.dtype.is_mx else
                                "pick a group size that divides it, or exclude the layer")
            formats[role] = to_format(scheme, target, role)
        if formats["weight"] is not None:
            formats["weight"] = dataclasses.replace(formats["weight"], scale_dtype=layout.weight_scale_dtype)
        fmt = LayerFormat(**formats)
        if not fmt.tensors:
            continue
        where = source.where(origin["weight" if fmt.weight is not None else next(iter(fmt.tensors))])
        if problem := layout.refusal(fmt) or layout.shape_problem(fmt, layer.in_features, layer.out_features):
            raise SpecError(f"{layer.path} cannot be stored in the {layout.name} layout: {problem}", where=where,
                            hint=f"exclude the layer, change its format, or choose another output.layout "
                                 f"(set at {source.where(LAYOUT_LOC)})")
        plan[layer.path] = LayerQuant(layer.path, fmt, tuple(applied), algorithm)
    if problem := layout.plan_problem(plan, [layer.path for layer in layers]):
        path, why = problem
        raise SpecError(f"{path} does not fit the {layout.name} layout: {why}", where=source.where(LAYOUT_LOC),
                        hint="give the layers one format, or choose output.layout: quark, which holds any mix")
    return plan
