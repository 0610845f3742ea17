r"""Command line of the exporter: ``python -m loss_service.export --help``."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from loss_service import losses

from . import DEFAULT_OPSET, FORMATS, LEVELS, MANIFEST_NAME, default_jobs, export_losses, summary_table
from .manifest import MANIFEST_KEY_VARIABLE, SIGNATURE_NAME


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="python -m loss_service.export",
        description=(
            "Write a TorchScript module (<loss>.pt) and ONNX graphs (<loss>.onnx, plus one per structural "
            "variant) for every registered loss into --out, reload each from disk and verify it against eager "
            "PyTorch, and write manifest.json (checksums, inputs/outputs, defaults, versions, verification), "
            f"signed into {SIGNATURE_NAME} when {MANIFEST_KEY_VARIABLE} is set. "
            "Exit status 1 if any artifact fails to export or verify, 2 for bad options."
        ),
    )
    parse.add_argument("--out", type=Path, default=Path("artifacts"), metavar="DIR",
                       help="output folder (created if missing; default: artifacts)")
    parse.add_argument("--loss", action="append", metavar="NAME", dest="losses",
                       help="export only this loss (repeatable; default: every registered loss: "
                            + ", ".join(losses.names()) + ")")
    parse.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                       help="export only this format (repeatable; default: both)")
    parse.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                       help=f"ONNX opset version (default: {DEFAULT_OPSET})")
    parse.add_argument("--verify", choices=LEVELS, default="full",
                       help="verification level: full (default: parity on several input sets for every reduction, "
                            "gradients, ±1e4 logits, 1e7-element float64 accuracy), standard (full without the "
                            "1e7-element accuracy check), quick (parity on one input set), none")
    parse.add_argument("--no-verify", action="store_const", const="none", dest="verify",
                       help="skip verification (same as --verify none)")
    parse.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="ONNX Runtime device for verification; auto uses CUDA only if a GPU is present")
    parse.add_argument("--default-variants-only", action="store_true",
                       help="export only <loss>.onnx per loss, not the graphs of other structural settings "
                            "(e.g. dice --mode=multiclass); faster cold starts")
    parse.add_argument("--jobs", type=int, default=default_jobs(), metavar="N",
                       help="export in N worker processes at once (default: %(default)s = min(2, CPU count); "
                            "1 = in this process)")
    parse.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parse


def main(argv: Optional[List[str]] = None) -> int:
    arguments = parser().parse_args(argv)
    valid = losses.names()
    unknown = [name for name in arguments.losses or [] if name not in valid]
    if unknown:
        print(
            f"python -m loss_service.export: error: unknown loss {', '.join(repr(n) for n in unknown)}; "
            f"valid losses: {', '.join(valid)}",
            file=sys.stderr,
        )
        return 2
    if arguments.opset < 18:
        print(f"python -m loss_service.export: error: --opset must be at least 18 (the dynamo exporter's minimum), got {arguments.opset}",
              file=sys.stderr)
        return 2
    if arguments.jobs < 1:
        print(f"python -m loss_service.export: error: --jobs must be at least 1, got {arguments.jobs}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = export_losses(
            arguments.out,
            names=arguments.losses,
            formats=tuple(arguments.formats or FORMATS),
            opset=arguments.opset,
            verify=arguments.verify,
            device=arguments.device,
            progress=not arguments.no_progress,
            all_variants=not arguments.default_variants_only,
            jobs=arguments.jobs,
        )
    print(summary_table(result.rows))
    print(f"{len(result.rows)} artifacts in {result.seconds:.1f}s -> {arguments.out / MANIFEST_NAME}"
          + ("" if result.ok else "  (FAILURES)"))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
