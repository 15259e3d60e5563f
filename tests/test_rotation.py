"""Rotation: Hadamard matrices, the residual stream found from dataflow on several transformers
families, rotations that leave the float model unchanged, and the pass in a build.

Exactness figures measured on an AVX2 CPU (rotations run as GEMMs in the weights' precision, so
they round like the model's own GEMMs, differently per CPU at the 1e-7 level)."""
import json

import pytest
import torch
from conftest import needs_shared
from families import captured, family_model, outlier_llama, perturbed

import qfx
from qfx.errors import UserError
from qfx.passes.base import PassContext
from qfx.passes.rotation import Rotation, RotationError
from qfx.runtime import ops
from qfx.runtime.hadamard import NoHadamardError, _hadamard, orthogonal


@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 28, 36, 44, 64, 384, 1536, 2816])
def test_hadamard_matrices_of_the_orders_layers_have(n):
    h = _hadamard(n)
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))  # integers: exact in float64
    q = orthogonal(n, "hadamard", seed=0).matrix()
    assert float((q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-12
    assert not torch.equal(q, orthogonal(n, "hadamard", seed=1).matrix()) or n == 1  # the signs follow the seed


class _Hadamard(torch.nn.Module):
    def forward(self, x):
        return ops.hadamard(x)


@pytest.mark.parametrize("n", [64, 384, 2816])
def test_the_online_hadamard_op_is_the_matrix_product(n):
    x = torch.randn(2, 5, n, generator=torch.Generator().manual_seed(0))
    expected = (x.double() @ _hadamard(n) / n ** 0.5).float()
    assert float((ops.hadamard(x) - expected).abs().max() / expected.abs().max()) < 1e-6
    exported = torch.export.export(_Hadamard(), (x,))
    assert torch.equal(exported.module()(x), ops.hadamard(x))  # the fake implementation traces


@pytest.mark.parametrize("n", [3, 6, 92, 172])
def test_orders_without_a_construction_are_refused(n):
    with pytest.raises(NoHadamardError, match=f"order {n} "):
        _hadamard(n)
    q = orthogonal(n, "random", seed=0).matrix()  # the way out the error names
    assert float((q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-12


def _rotate(bundle, gm, example, **options):
    return Rotation(**options).run(gm, PassContext(plan={}, root_prefix=bundle.root_prefix, example=example)).stats


# family -> (linears reading the stream, tied head untied); each: 2 layers, 4 writers, 5 norms.
ROTATED = {"llama": (11, True), "qwen2": (11, False), "mistral": (11, False),
           "phi3": (5, False),  # fused qkv_proj and gate_up_proj
           "gemma": (11, True)}  # (1 + weight) norms, scaled embedding


# Relative logits error after rotating (R1 + R2). float32: measured 2.8e-7..4.5e-7. float64:
# 7.5e-8..9.6e-8, the floor of these models' RMSNorm, which computes in float32 even for
# float64 inputs.
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
@pytest.mark.parametrize("family", list(ROTATED))
def test_rotation_leaves_the_float_model_unchanged(family, dtype, bound):
    bundle, gm, example = captured(family_model(family), dtype)
    embedding = bundle.hf_model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        reference = bundle.module(*example)
        record = _rotate(bundle, gm, example)
        out = gm(*example)
        after = bundle.module(*example)
    readers, tied = ROTATED[family]
    assert (len(record["writers"]), len(record["readers"]), len(record["norms_fused"])) == (4, readers, 5)
    assert [h["block"] for h in record["heads"]] == [16, 16]
    assert bool(record["untied"]) == tied
    assert not torch.allclose(gm.get_parameter(bundle.root_prefix + record["embeddings"][0]), embedding)
    error = float((out - reference).norm() / reference.norm())
    assert error <= bound, error
    assert torch.equal(after, reference), "rotating must not touch the user's model"


# With the online Hadamard before each down projection (R4), through qfx.compile up to
# calibration (the graph is still float): measured 2.9e-7..4.5e-7 (float32).
@pytest.mark.parametrize("family", list(ROTATED))
def test_rotation_with_online_hadamards_leaves_the_float_model_unchanged(family):
    model = perturbed(family_model(family))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    result = qfx.compile(model, ROT_SPEC, pipeline="annotate,rotation{online_down_proj=true},observe,calibrate")
    assert result.stats["rotation"]["online"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        error = float((result.graph(ids) - reference).norm() / reference.norm())
    print(f"{family} with online Hadamards: relative logits error {error:.2e}")
    assert error <= 1e-5, error


@pytest.mark.parametrize("family", ["opt", "bert"])
def test_layer_norm_models_are_refused_naming_the_norm(family):
    bundle, gm, example = captured(family_model(family), torch.float32)
    with pytest.raises(RotationError, match="a LayerNorm reads the residual stream") as info:
        _rotate(bundle, gm, example)
    assert "LayerNorm in hf." not in str(info.value) and "layer_norm" in str(info.value).lower()
    assert "residual: false" in str(info.value)  # the way to keep R2 and R4


# LayerNorm models keep the head rotation (R2) and the online Hadamard (R4), found by dataflow
# alone (OPT's fc2 after ReLU, BERT's output.dense after GELU). Measured 1.6e-7 (OPT), 9.2e-8 (BERT).
@pytest.mark.parametrize("family, online", [("opt", "model.decoder.layers.{}.fc2"),
                                            ("bert", "encoder.layer.{}.output.dense")])
def test_layer_norm_models_keep_the_head_and_online_rotations_exactly(family, online):
    model = perturbed(family_model(family))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    spec = ROT_SPEC if family == "opt" else dict(ROT_SPEC, quantization={"preset": "w8a8-int8"})
    result = qfx.compile(model, spec, pipeline="annotate,rotation{residual=false,online_down_proj=true},observe,"
                                                "calibrate")
    record = result.stats["rotation"]
    assert record["online"] == [online.format(i) for i in range(2)] and not record["residual"]
    assert len(record["heads"]) == 2 and record["writers"] == record["norms_fused"] == []
    with torch.no_grad():
        if family == "bert":
            reference = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            out = result.graph(ids, torch.ones_like(ids))
        else:
            reference, out = model(input_ids=ids, use_cache=False).logits, result.graph(ids)
    error = float((out - reference).norm() / reference.norm())
    assert error <= 1e-5, error


class _Toy(torch.nn.Module):
    """Embedding, two RMSNorm residual blocks and a head; `variant` breaks one rule."""

    def __init__(self, variant: str):
        super().__init__()
        torch.manual_seed(0)
        self.variant = variant
        self.embed = torch.nn.Embedding(32, 16)
        self.norms = torch.nn.ParameterList([torch.nn.Parameter(1 + 0.3 * torch.randn(16)) for _ in range(3)])
        self.first, self.second = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.narrow_in = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 32)

    def rms(self, x, weight):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x if self.variant == "shared" else x * weight  # shared: no norm weight to fuse first

    def forward(self, ids):
        x = self.embed(ids)
        h = self.rms(x, self.norms[0])
        if self.variant == "slice":
            x = x + self.narrow_in(h[..., :8])
        elif self.variant == "gate":
            x = x * torch.sigmoid(self.first(h))
        else:
            x = x + self.first(h)
        second = self.first if self.variant == "shared" else self.second
        x = x + second(self.rms(x, self.norms[1]))
        logits = self.head(self.rms(x, self.norms[2]))
        return (logits, x) if self.variant == "hidden" else logits


@pytest.mark.parametrize("variant, message", [
    ("shared", r"first.weight is read by more than one op \(shared or tied weights\)"),
    ("slice", "a shape op splits or moves the hidden dimension of the residual stream at aten.slice"),
    ("gate", "multiplied channel by channel by a value that is not a norm weight"),
    ("hidden", "the model returns the residual stream itself"),
])
def test_what_a_rotation_would_change_is_refused_by_name(variant, message):
    from qfx.capture import export, wrap_module

    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    bundle = wrap_module((_Toy("ok"), (ids,)))
    gm = export(bundle, (ids,))
    with torch.no_grad():
        reference = bundle.module(ids)
        _rotate(bundle, gm, (ids,))
        assert float((gm(ids) - reference).norm() / reference.norm()) < 1e-5  # the unbroken model rotates
    bundle = wrap_module((_Toy(variant), (ids,)))
    with pytest.raises(RotationError, match=message):
        _rotate(bundle, export(bundle, (ids,)), (ids,))


@needs_shared
def test_rotation_of_the_tinystories_llama_is_exact():
    from conftest import TINYSTORIES
    from transformers import AutoModelForCausalLM

    bundle, gm, example = captured(AutoModelForCausalLM.from_pretrained(TINYSTORIES), torch.float32)
    with torch.no_grad():
        reference = bundle.module(*example)
        record = _rotate(bundle, gm, example)
        error = float((gm(*example) - reference).norm() / reference.norm())
    print(f"TinyStories rotation: {len(record['heads'])} heads rotated, relative logits error {error:.2e}")
    assert len(record["heads"]) == 5 and record["untied"]
    assert error <= 1e-5, error  # measured 3.7e-7 (AVX2)


def _llama(hidden: int, heads: int, intermediate: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                                        num_hidden_layers=1,
                                        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=256))


ROT_SPEC = {"version": 1, "calibration": {"synthetic": True, "samples": 4, "seq_len": 16},
            "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]}}


def test_a_hidden_size_without_a_hadamard_matrix_is_an_error_naming_the_way_out(tmp_path):
    model = _llama(92, 2)  # 92 = 4 x 23: no construction here, nor for the head size 46
    with pytest.raises(UserError, match="the hidden size is 92") as info:
        qfx.compile(model, dict(ROT_SPEC, algorithms=[{"rotation": {"kind": "hadamard"}}]), output_dir=tmp_path / "o")
    assert "kind: random" in str(info.value)
    assert not (tmp_path / "o").exists()
    result = qfx.compile(model, dict(ROT_SPEC, algorithms=[{"rotation": {"kind": "random"}}]))
    assert [h["block"] for h in result.stats["rotation"]["heads"]] == [46]
    assert result.stats["check"]["rel_error"] < 0.05


def test_an_online_hadamard_of_an_impossible_size_is_an_error_naming_the_layer():
    model = _llama(64, 2, intermediate=92)
    with pytest.raises(UserError, match="the input of model.layers.0.mlp.down_proj has 92 channels"):
        qfx.compile(model, dict(ROT_SPEC, algorithms=[{"rotation": {"online_down_proj": True}}]))


def test_rotation_cannot_follow_smoothing_or_calibration():
    spec = dict(ROT_SPEC, model={"factory": "qfx.examples:tiny_llama"})
    with pytest.raises(UserError, match="rotation cannot run after a pass that made the graph observed, smoothed"):
        qfx.compile(spec=spec, pipeline="annotate,observe,smoothquant,rotation,convert,freeze")
    for pipeline in ("annotate,observe,calibrate,rotation,convert,freeze", "annotate,observe,rotation,calibrate,"
                     "convert,freeze"):  # observers in the graph would see the unrotated model
        with pytest.raises(UserError, match="rotation cannot run after a pass that made the graph observed"):
            qfx.compile(spec=spec, pipeline=pipeline)
    with pytest.raises(UserError, match="pass rotation needs annotated first"):  # R4 goes to the quantized layers
        qfx.compile(spec=spec, pipeline="rotation,annotate,observe,calibrate,convert,freeze")


def test_built_artifact_records_the_rotation_and_unties_the_head(built_specs):
    result = built_specs["tiny-w8a8-int8-rotation-smoothquant.yaml"]
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    assert manifest["pipeline"] == "annotate,rotation{online_down_proj=True},observe,smoothquant,convert,freeze"
    rotation = manifest["rotation"]
    assert (rotation["kind"], rotation["hidden"], len(rotation["heads"])) == ("hadamard", 64, 2)
    assert rotation["untied"] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert manifest["tied"] == {}  # both tensors stored: they differ once the final norm is fused
    config = json.loads((result.artifact_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    online = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert rotation["online"] == online and config["qfx_online_transforms"] == {"hadamard": online}
    assert [p for p, layer in manifest["layers"].items() if layer.get("input_transforms") == ["hadamard"]] == online
    assert manifest["verify"]["output_rel_error"] < 1e-5  # ONNX Runtime runs the online Hadamards too
    report = (result.artifact_dir / "report.md").read_text()
    assert "## Rotation" in report and "Quark-format loaders (vLLM, transformers through amd-quark) do not" in report
    assert "| hadamard, then int8 per_tensor" in report  # the layer table shows the online transform
    png = result.artifact_dir / "rotation_channels.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "rotation_channels.png" in manifest["artifact"]
    assert "](rotation_channels.png)" in report and "channel_max" not in rotation


def test_rotation_tames_outlier_channels():
    model = outlier_llama()
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    errors = {}
    for name, algorithms in (("plain", []), ("rotation", [{"rotation": {}}])):
        result = qfx.compile(model, dict(ROT_SPEC, algorithms=algorithms))
        with torch.no_grad():
            errors[name] = float((result.graph(ids) - reference).norm() / reference.norm())
    print(f"outlier small Llama, logits relative error: {errors}")
    assert errors["rotation"] < 0.5 * errors["plain"], errors  # measured 0.089 vs 0.200 (AVX2)
    shown = result.stats["rotation"]["channel_max"]  # the report's picture: the worst input, before and after
    ratio = {k: max(shown[k]) / sorted(shown[k])[len(shown[k]) // 2] for k in ("before", "after")}
    print(f"{shown['layer']}: max / median channel {ratio}")
    assert ratio["before"] > 20 and ratio["after"] < 5, ratio  # measured 67 -> 1.5
