r"""``manifest.json``: what the server and the C++ example read instead of guessing.

Deterministic: keys sorted, artifacts sorted by file name, numbers rounded to 3 significant digits
in verification results; the only run-dependent values are under the top-level ``"run"`` key
(timestamp and durations).

Every entry carries the :func:`fingerprint` of the code, registry declarations and library versions
it was made from, so a reader can tell an artifact of older loss code from a current one without
re-running it.

With a key in ``LOSS_SERVICE_MANIFEST_KEY``, :func:`write` also writes ``manifest.json.hmac``, the
HMAC-SHA256 of the manifest's bytes, and the server refuses a manifest whose signature is missing or
wrong (:func:`check_signature`): without the key, whoever can write the folder can also edit the
checksums of swapped files.
"""
from __future__ import annotations

import ast
import datetime
import functools
import hashlib
import hmac
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from loss_service import __version__ as loss_service_version
from loss_service import layout, losses
from loss_service.losses import LossSpec, ParamSpec

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = MANIFEST_NAME + ".hmac"
MANIFEST_KEY_VARIABLE = "LOSS_SERVICE_MANIFEST_KEY"
SCHEMA_VERSION = 1


class SignatureError(ValueError):
    r"""``manifest.json``'s HMAC signature is missing or does not match (a key is set)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_sources() -> List[Path]:
    r"""The files whose code decides what an artifact computes, sorted.

    ``loss_service/losses/*.py`` (kernels, parameters, defaults), ``loss_service/layout.py`` (the
    canonical ONNX layout) and ``loss_service/export/artifacts.py`` (how graphs and modules are built).
    """
    from loss_service import losses as losses_package

    from . import artifacts as artifacts_module

    sources = sorted(Path(losses_package.__file__).parent.glob("*.py"))
    return sources + [Path(layout.__file__), Path(artifacts_module.__file__)]


def fingerprint() -> str:
    r"""sha256 of what determines the artifacts: the code of :func:`fingerprint_sources`
    (:func:`code_digest`: without comments and docstrings), :func:`registry_declarations` and the
    torch/onnx/onnxruntime versions.

    An artifact whose manifest entry has another fingerprint was exported from other loss code or
    other exporter/runtime versions; the server treats it as missing and exports it again. An edit
    of comments or docstrings alone keeps the fingerprint, and so the artifacts; any other edit of
    those files changes it, deliberately coarse: a helper in one family module can change another
    loss's kernel.
    """
    digest = hashlib.sha256()
    library = versions()
    parts = [part for path in fingerprint_sources()
             for part in (f"{path.parent.name}/{path.name}".encode(), code_digest(path.read_bytes()))]
    parts.append(json.dumps(registry_declarations(), sort_keys=True).encode())
    parts += [f"{name}={library[name]}".encode() for name in ("torch", "onnx", "onnxruntime")]
    for part in parts:
        # Length-prefixed: no two different sequences of parts hash alike.
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


# Every field of a node that holds a list of statements (ExceptHandler and match_case hold theirs in body).
_STATEMENT_LISTS = ("body", "orelse", "finalbody", "handlers", "cases")


@functools.lru_cache(maxsize=64)
def code_digest(source: bytes) -> bytes:
    r"""sha256 of the code of the Python ``source``: its syntax tree without string statements.

    The tree has no comments, and ``ast.dump`` leaves out line numbers; a statement that is only a
    string (a docstring, or a string used as a comment) does nothing when run. So sources that
    differ only in comments, docstrings, blank lines or line breaks have the same digest. Cached by
    content: a server start asks for the fingerprint more than once.
    """
    tree = ast.parse(source)
    _drop_string_statements(tree)
    return hashlib.sha256(ast.dump(tree).encode()).digest()


def _drop_string_statements(node: ast.AST) -> None:
    for name in _STATEMENT_LISTS:
        statements = getattr(node, name, None)
        if isinstance(statements, list):
            statements[:] = [statement for statement in statements if not (
                isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                and isinstance(statement.value.value, str))]
            for statement in statements:
                _drop_string_statements(statement)


def registry_declarations() -> List[Dict[str, Any]]:
    r"""What the registry declares of each loss, which the artifacts and their manifest entries are
    made from: ``describe()`` (input contract; parameters with kind, default, range, doc and
    ``graph_input``) and ``variants`` (the structural settings that get their own ONNX graph); in
    registration order."""
    return [{"loss": spec.describe(), "variants": list(spec.variants)} for spec in losses.specs()]


def versions() -> Dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    return {
        "loss_service": loss_service_version,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _graph_default(param: ParamSpec) -> Dict[str, Any]:
    r"""How a generic caller fills a hyperparameter input it does not set."""
    if param.kind in ("vector", "float_or_vector"):
        if param.default is None:
            return {"fill": 1.0, "shape": ["C"], "meaning": "unset (a vector of ones is identical)"}
        if isinstance(param.default, (int, float)):
            return {"fill": float(param.default), "shape": ["C"]}
        return {"value": _json_value(param.default), "shape": ["C"]}
    if param.kind == "str":
        return {"value": param.choices.index(param.default), "shape": [], "choices": list(param.choices),
                "meaning": "the index of the choice"}
    if param.kind == "int" and param.default is None:
        return {"value": layout.UNSET_INT, "shape": [], "meaning": "unset (int64's smallest value)"}
    return {"value": _json_value(param.default), "shape": []}


def value_info(value) -> Dict[str, Any]:
    r"""Name, dtype and shape (dimension names or sizes) of a graph input or output, as the manifest records them."""
    import onnx

    tensor = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    return {
        "name": value.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
        "shape": shape,
        "dynamic_axes": [i for i, d in enumerate(tensor.shape.dim) if d.dim_param],
    }


def onnx_entry(spec: LossSpec, variant: Dict[str, Any], path: Path, opset: int) -> Dict[str, Any]:
    import onnx

    model = onnx.load(str(path))
    params = {p.name: p for p in layout.graph_params(spec)}
    inputs = []
    for value in model.graph.input:
        info = value_info(value)
        if value.name in ("predictions", "targets"):
            info["role"] = value.name
        elif value.name == "weights":
            info["role"] = "weights"
            info["default"] = {"fill": 1.0, "shape": info["shape"], "meaning": "no weights"}
        elif value.name == layout.SAMPLE_WEIGHTS:
            info["role"] = "sample_weights"
            info["default"] = {"fill": 1.0, "shape": info["shape"], "meaning": "no per-sample weights"}
        elif value.name == "reduction":
            info["role"] = "reduction"
            info["default"] = {"value": layout.REDUCTION_CODES[spec.defaults().get("reduction", "mean")], "shape": []}
            info["codes"] = dict(layout.REDUCTION_CODES)
        else:
            info["role"] = "hyperparameter"
            info["kind"] = params[value.name].kind
            info["default"] = _graph_default(params[value.name])
            if variant.get(value.name) == layout.SCALAR_FORM:
                # The scalar-form graph has no "unset": the example value the graph was traced with.
                info["default"] = {"value": layout.variant_params(spec, variant)[value.name], "shape": [],
                                   "meaning": "scalar form of a float_or_vector parameter"}
        inputs.append(info)
    outputs = [value_info(value) for value in model.graph.output]
    meanings = {
        "loss": "float64 scalar: the reduction chosen by the reduction code (for none: the sum)",
        "values": "weighted unreduced losses in the canonical layout",
        "totals": "float64 additive statistics of the batch",
        "sample_totals": "float64 additive statistics per sample (N, K)",
        "class_totals": "float64 additive statistics per class (C, K_c)",
    }
    for output in outputs:
        output["meaning"] = meanings.get(output["name"], "")
    return {
        "loss": spec.name,
        "format": "onnx",
        "file": path.name,
        "variant": {k: _json_value(v) for k, v in variant.items()},
        "variant_key": layout.variant_key(variant),
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "values_layout": layout.values_layout(spec, variant),
        "weights_layout": layout.weights_layout(spec, variant),
        "hyperparameters": [p.describe() for p in spec.params],
    }


def torchscript_entry(spec: LossSpec, path: Path) -> Dict[str, Any]:
    attributes = []
    for param in spec.params:
        described = param.describe()
        described["set_from_cpp"] = (
            f'module.setattr("{param.name}", torch::tensor(...))  // empty tensor = unset'
            if param.kind in ("vector", "float_or_vector")
            else f'module.setattr("{param.name}", value)'
        )
        attributes.append(described)
    return {
        "loss": spec.name,
        "format": "torchscript",
        "file": path.name,
        "variant": {},
        "variant_key": "",
        "methods": {
            "forward": "forward(predictions, targets, weights=None) -> loss",
            "statistics": "statistics(predictions, targets, weights, per_sample, values=True, per_class=False) -> "
            "(values, totals, sample_totals, or class_totals with per_class)",
            "reductions": "reductions(totals) -> [sum, mean, weighted_mean]",
            "class_reductions": "class_reductions(class_totals) -> (C, 3) [sum, mean, weighted_mean] per class, "
            "(C, 4) with the class's overlap index for region losses",
        },
        "inputs": [
            {"name": "predictions", "dtype": "float32|float64|float16|bfloat16", "shape": spec.prediction_shape},
            {"name": "targets", "shape": spec.target_shape, "kind": spec.targets},
            {"name": "weights", "optional": True, "shape": "(N,) or broadcastable to the values"},
        ],
        "outputs": [{"name": "loss", "shape": "scalar, or the values' shape for reduction none"}],
        "hyperparameters": attributes,
    }


def run_record(seconds: float, verify: str, jobs: int, failed: Sequence[str]) -> Dict[str, Any]:
    r"""The manifest's ``run`` section, its only run-dependent part: when the run finished, how long it
    took, its verification level and worker processes, and the files that failed."""
    return {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "verify": verify,
        "jobs": jobs,
        "failed": sorted(failed),
    }


def finish_entry(
    entry: Dict[str, Any], path: Path, verification: Optional[Dict[str, Any]], source_fingerprint: str
) -> Dict[str, Any]:
    entry["fingerprint"] = source_fingerprint
    entry["sha256"] = sha256(path)
    entry["size_bytes"] = path.stat().st_size
    entry["verification"] = verification
    return entry


def layout_description() -> Dict[str, Any]:
    return {
        "predictions": "(N, C, S) float32: class dim moved to 1, other dims flattened into S; (N,) -> (N, 1, 1)",
        "targets": "(N, C, S) float32 dense, or (N, S) int64 class indices",
        "weights": "float32, the canonical shape of values (of predictions for region losses); ones = no weights",
        "sample_weights": "region losses only: (N,) float32 per-sample weights (a request's (N,) weights; "
        "weights is then all ones); ones = no per-sample weights",
        "hyperparameters": "float -> 0-d float32, int -> 0-d int64, bool -> 0-d bool, vectors -> (C,) float32",
        "reduction_codes": dict(layout.REDUCTION_CODES),
        "outputs": list(layout.ONNX_OUTPUTS),
        "implementation": "loss_service.layout.to_canonical",
    }


def merge(
    previous: Optional[Dict[str, Any]], entries: List[Dict[str, Any]], out: Path, opset: int, source_fingerprint: str
) -> List[Dict[str, Any]]:
    r"""This run's entries plus the previous manifest's entries for other files that are still valid.

    A previous entry is kept only when it was written by the same versions (and opset for ONNX)
    from the same sources (``fingerprint``) and its file still has the recorded sha256, so
    ``--loss`` runs (and the server's background exports) accumulate into one manifest.
    """
    by_file = {entry["file"]: entry for entry in entries}
    if previous and previous.get("versions") == versions() and previous.get("schema_version") == SCHEMA_VERSION:
        for entry in previous.get("artifacts", []):
            path = out / entry["file"]
            if entry["file"] in by_file or not path.exists():
                continue
            if entry["format"] == "onnx" and entry.get("opset") != opset:
                continue
            if entry.get("fingerprint") != source_fingerprint:
                continue
            if sha256(path) == entry["sha256"]:
                by_file[entry["file"]] = entry
    return [by_file[name] for name in sorted(by_file)]


def write(
    out: Path, entries: List[Dict[str, Any]], opset: int, run: Dict[str, Any], source_fingerprint: Optional[str] = None
) -> Dict[str, Any]:
    r"""Merge ``entries`` into ``out/manifest.json`` atomically (a temporary file renamed over it),
    and sign it into ``manifest.json.hmac`` (likewise) when :func:`manifest_key` is set.

    Readers never see a half-written manifest. Writers must not overlap (a read-merge-write is not
    a transaction): ``python -m loss_service.export`` writes once at the end of its run, and the server writes
    from one thread (the start-up export, then its background exporter).
    """
    source_fingerprint = source_fingerprint or fingerprint()
    path = out / MANIFEST_NAME
    previous = None
    if path.exists():
        try:
            data = path.read_bytes()
            # A SignatureError is a ValueError too: the entries of a manifest that is not signed with
            # today's key are not carried over (re-signing them would vouch for what nobody checked).
            check_signature(out, data)
            previous = json.loads(data)
        except (OSError, ValueError):
            previous = None
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "versions": versions(),
        "opset": opset,
        "fingerprint": source_fingerprint,
        "layout": layout_description(),
        "artifacts": merge(previous, entries, out, opset, source_fingerprint),
        "run": run,
    }
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    # The manifest first: a crash between the two renames leaves a signature that does not match,
    # which a server with the key refuses (it fails closed).
    _replace(path, data)
    key = manifest_key()
    if key is not None:
        _replace(out / SIGNATURE_NAME, (signature(data, key) + "\n").encode())
    return manifest


def _replace(path: Path, data: bytes) -> None:
    r"""Write ``data`` to ``path`` atomically: a temporary file in the same folder renamed over it."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the manifest is read by other users (C++ trainers)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def manifest_key() -> Optional[bytes]:
    r"""The HMAC key in ``LOSS_SERVICE_MANIFEST_KEY`` (UTF-8); ``None`` when unset or empty: no signing."""
    value = os.environ.get(MANIFEST_KEY_VARIABLE)
    return value.encode() if value else None


def signature(data: bytes, key: bytes) -> str:
    r"""HMAC-SHA256 of a manifest's bytes, hex: the content of ``manifest.json.hmac``."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def check_signature(out: Path, data: bytes) -> None:
    r"""Raise :class:`SignatureError` unless ``out/manifest.json.hmac`` signs ``data`` (the manifest's
    bytes) with :func:`manifest_key`; nothing to check when no key is set."""
    key = manifest_key()
    if key is None:
        return
    path = Path(out) / SIGNATURE_NAME
    fix = f"re-export with the key set: {MANIFEST_KEY_VARIABLE}=... python -m loss_service.export --out {out}"
    try:
        recorded = path.read_bytes().strip()
    except FileNotFoundError:
        raise SignatureError(f"{path} is missing and {MANIFEST_KEY_VARIABLE} is set; {fix}") from None
    if not hmac.compare_digest(recorded, signature(data, key).encode()):
        raise SignatureError(
            f"{Path(out) / MANIFEST_NAME}: its HMAC does not match {path} (edited, or signed with another key); {fix}"
        )


def load(out: Path) -> Dict[str, Any]:
    return json.loads((Path(out) / MANIFEST_NAME).read_text())
