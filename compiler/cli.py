"""The `qfx` command: build, inspect, eval, verify, schema. Exit codes: 0 ok, 2 bad input, 3 over the
accuracy budget, 1 internal."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _build(args) -> int:
    import qfx

    result = qfx.compile(spec=args.spec, pipeline=args.pipeline, output_dir=args.output,
                         force=True if args.force else None)
    if result.artifact_dir is None:
        print("built (no output.dir in the spec, so nothing was written; use -o DIR)")
        return 0
    m = result.manifest
    print(f"wrote {result.artifact_dir}")
    print(f"  {len(m['layers'])} layers quantized, kept in float: {', '.join(m['excluded']) or 'none'}")
    if m.get("check"):
        figures = ", ".join(f"{k} {v:.4g}" for k, v in m["check"].items() if k != "inputs")
        print(f"  quantized vs float on {m['check']['inputs']}: {figures}")
    if m.get("evaluate"):
        e = m["evaluate"]
        figures = ", ".join(f"{k} {v:.4g}" for k, v in e["figures"].items() if k not in ("tokens", "lines"))
        print(f"  evaluated on {e['data']}: {figures}; within budget ({', '.join(e['budget']) or 'none set'})")
    if m.get("verify"):
        v = m["verify"]
        print(f"  verified model.onnx = model.safetensors: {v['tensors_identical']} tensors bit-identical, "
              f"ONNX Runtime vs torch relative error {v['output_rel_error']:.3g} (tolerance {v['tolerance']:g})")
    return 0


def _inspect(args) -> int:
    """Shows the manifest, then fails (exit 2) if it was edited after the build: inspect is how
    one looks at a suspect artifact, so it shows what it can, but never lets an unsealed manifest
    pass as the build's record. The report is rendered from manifest.json, not read from
    report.md, which no hash covers."""
    from qfx.errors import ArtifactError
    from qfx.lowering.manifest import render_report
    from qfx.runtime.artifact_files import check_manifest_seal, read_manifest

    folder = Path(args.dir)
    manifest = read_manifest(folder, sealed=False)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
    else:
        try:
            report = render_report(manifest)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ArtifactError(f"manifest.json lacks what the report shows ({type(exc).__name__}: {exc})",
                                where=str(folder / "manifest.json"),
                                hint="rebuild the artifact; `qfx inspect --json` prints the manifest as it is"
                                ) from None
        print(report, end="")
    sys.stdout.flush()
    check_manifest_seal(folder, manifest)
    return 0


def _eval(args) -> int:
    from qfx.budget import parse_budget
    from qfx.evaluation import evaluate_artifact

    budget = parse_budget(args.budget) if args.budget else None
    figures = evaluate_artifact(Path(args.dir), Path(args.text), window=args.window, max_tokens=args.max_tokens,
                                trust_factory=args.trust_factory, budget=budget)
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
        return 0
    for key, value in figures.items():
        print(f"{key:>30}: {value:.6g}" if isinstance(value, float) else f"{key:>30}: {value}")
    if budget:
        print(f"within budget: {', '.join(f'{k} {v:g}' for k, v in budget.items())}")
    return 0


def _verify(args) -> int:
    from qfx.runtime.verify import verify_artifact

    figures = verify_artifact(Path(args.dir), providers=args.providers or None, trust_factory=args.trust_factory)
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
        return 0
    print(f"verified {args.dir}: model.safetensors and model.onnx are the same model")
    print(f"  {figures['tensors_identical']} stored tensors bit-identical")
    print(f"  outputs on {figures['inputs']}: ONNX Runtime ({', '.join(figures['providers'])}) vs torch "
          f"relative error {figures['output_rel_error']:.3g} (tolerance {figures['tolerance']:g}), "
          f"max abs {figures['max_abs_error']:.3g}, with {figures['activations_fed']} quantized activations "
          f"fed layer by layer")
    print(f"  activation values that differ (codes flipped by float rounding): "
          f"{100 * figures['activation_values_differing']:.4g}%; running free, relative error "
          f"{figures['free_running_rel_error']:.3g}")
    return 0


def _schema(args) -> int:
    from qfx.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2, sort_keys=True))
    return 0


TRUST_HELP = ("import and call the model factory that the artifact's manifest names (code the artifact "
              "chooses; qfx.examples factories need no flag)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qfx", description="Quantize PyTorch / Hugging Face models from a declarative spec.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the artifact a spec describes")
    b.add_argument("spec", help="spec file (.yaml or .json)")
    b.add_argument("-o", "--output", help="output directory (overrides output.dir)")
    b.add_argument("--pipeline", help="pass pipeline, e.g. 'annotate,observe,calibrate,convert,freeze'")
    b.add_argument("--force", action="store_true", help="replace an output directory that qfx did not write")
    b.set_defaults(func=_build)
    i = sub.add_parser("inspect", help="show an artifact's report (or --json manifest)")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)
    e = sub.add_parser("eval", help="perplexity of float vs quantized, logits error and top-1 agreement, "
                                    "optionally judged against a budget")
    e.add_argument("dir")
    e.add_argument("--text", required=True, help="UTF-8 text, tokenized whole with the artifact's tokenizer")
    e.add_argument("--window", type=int, default=256, help="tokens per non-overlapping window (default 256, at least 2)")
    e.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    e.add_argument("--json", action="store_true")
    e.add_argument("--trust-factory", action="store_true", help=TRUST_HELP)
    e.add_argument("--budget", action="append", metavar="NAME=VALUE[,...]",
                   help="fail (exit 3) outside it: perplexity_increase=2%%, logits_rel_error=0.1, "
                        "top1_agreement=0.95")
    e.set_defaults(func=_eval)
    v = sub.add_parser("verify", help="prove model.safetensors and model.onnx hold the same codes and compute the same")
    v.add_argument("dir")
    v.add_argument("--providers", nargs="+", metavar="PROVIDER",
                   help="ONNX Runtime providers (default: MIGraphX, ROCm, CPU, whichever are installed)")
    v.add_argument("--json", action="store_true")
    v.add_argument("--trust-factory", action="store_true", help=TRUST_HELP)
    v.set_defaults(func=_verify)
    s = sub.add_parser("schema", help="print the spec's JSON Schema")
    s.set_defaults(func=_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from qfx.errors import QfxError

    try:
        return args.func(args)
    except QfxError as exc:
        print(f"qfx: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qfx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a qfx bug: short message, full trace only on request
        print(f"qfx: internal error: {type(exc).__name__}: {exc}\n"
              "  this is a bug in qfx; rerun with QFX_TRACEBACK=1 for the full trace", file=sys.stderr)
        import os
        if os.environ.get("QFX_TRACEBACK"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
