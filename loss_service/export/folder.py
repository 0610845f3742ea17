r"""An artifacts folder as the server reads it: which of its manifest's entries are current, and each
file's bytes once they are checked to be the artifact the export plan says.

An entry is *current* when the manifest was written by this loss_service/torch/onnx/onnxruntime/numpy
(:func:`.manifest.versions`), its fingerprint is today's (:func:`.manifest.fingerprint`) and its file
exists; anything else counts as missing. A manifest must carry a valid HMAC signature when
``LOSS_SERVICE_MANIFEST_KEY`` is set (:func:`.manifest_module.check_signature`). What is checked before an
artifact is served: docs/export.md, "What the server checks before serving an artifact".
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch

from loss_service import layout
from loss_service.losses import LossSpec

from . import manifest as manifest_module
from .artifacts import example_feeds, onnx_identity, torchscript_file_name

if TYPE_CHECKING:
    from . import Job


class ArtifactError(RuntimeError):
    r"""An unreadable or unsigned manifest, or an artifact that is not what its manifest entry says
    (checksum, loss, variant)."""


def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    r"""``folder``'s manifest (``None`` without one), once its signature is checked (if a key is set)."""
    path = folder / manifest_module.MANIFEST_NAME
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        manifest_module.check_signature(folder, data)
    except manifest_module.SignatureError as exc:
        raise ArtifactError(str(exc)) from None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None


def current_entries(folder: Path, manifest: Optional[Dict[str, Any]], fingerprint: str) -> Dict[str, Dict[str, Any]]:
    r"""The manifest entries, by file, that can be used as they are (see the module docstring)."""
    if manifest is None or manifest.get("versions") != manifest_module.versions():
        return {}
    return {
        entry["file"]: entry
        for entry in manifest.get("artifacts", [])
        if entry.get("fingerprint") == fingerprint and (folder / entry["file"]).exists()
    }


def read_verified(folder: Path, entry: Dict[str, Any], job: "Job") -> bytes:
    r"""The bytes of ``entry``'s file, once checked to be ``job``'s artifact (the plan's for that file name).

    The entry must name ``job``'s loss, format and variant, the bytes must have the entry's sha256,
    and a graph must be that loss and variant's (:func:`check_graph`). A TorchScript module is
    checked once loaded (:func:`check_scripted`), which the TorchScript backend does anyway.
    """
    path = folder / entry["file"]
    claimed = (entry["loss"], entry["format"], entry["variant_key"])
    planned = (job.spec.name, job.format, layout.variant_key(job.variant))
    if claimed != planned:
        raise ArtifactError(f"{path}: its manifest entry says (loss, format, variant) {claimed}, the file name "
                            f"{planned}{_fix(folder)}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ArtifactError(f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']}{_fix(folder)}")
    if job.format == "onnx":
        check_graph(path, entry, job, data)
    return data


def check_graph(path: Path, entry: Dict[str, Any], job: "Job", data: bytes) -> None:
    r"""Raise :class:`ArtifactError` unless ``data`` is the ONNX graph of ``job``'s loss and variant.

    Compared: the loss and variant the exporter wrote into the model metadata
    (:func:`.artifacts.onnx_identity`; many graphs have the same inputs and outputs); each
    input's name, element type and rank with the feeds the layout makes for that variant
    (:func:`.artifacts.example_feeds`, i.e. :func:`loss_service.layout.to_canonical`), in
    graph order; the output names with ``layout.ONNX_OUTPUTS``; and the inputs and outputs (names,
    element types, shapes) with those the manifest entry recorded.
    """
    import onnx

    model = onnx.load_model_from_string(data)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    differences = [
        f"metadata {key} {metadata.get(key)!r}, expected {value!r}"
        for key, value in onnx_identity(job.spec, job.variant).items()
        if metadata.get(key) != value
    ]
    inputs = [manifest_module.value_info(value) for value in model.graph.input]
    outputs = [manifest_module.value_info(value) for value in model.graph.output]
    feeds = example_feeds(job.spec, job.variant)
    names = layout.onnx_input_names(job.spec)
    differences += _differences(
        "inputs",
        [(value["name"], value["dtype"], len(value["shape"])) for value in inputs],
        [(name, feeds[name].numpy().dtype.name, feeds[name].dim()) for name in names],
    )
    differences += _differences("outputs", [value["name"] for value in outputs], layout.ONNX_OUTPUTS)
    for side, found in (("inputs", inputs), ("outputs", outputs)):
        if side in entry:
            differences += _differences(f"{side} vs the manifest entry", _typed_shapes(found), _typed_shapes(entry[side]))
    if differences:
        variant = layout.variant_key(job.variant) or "default variant"
        raise ArtifactError(
            f"{path} is not the ONNX graph of {job.spec.name} ({variant}): {'; '.join(differences)}{_fix(path.parent)}"
        )


def check_scripted(spec: LossSpec, scripted: torch.jit.ScriptModule, configured: torch.nn.Module) -> None:
    r"""Raise :class:`ArtifactError` unless ``scripted`` (a loaded ``<loss>.pt``) is ``spec``'s module.

    Compared with the registry: the TorchScript class (``spec.module``'s qualified name), the methods
    a reader calls (``statistics``, ``reductions``, ``class_reductions``), and every hyperparameter of ``spec`` as the eager
    module ``configured`` (``losses.build(spec.name)``) holds it, which is how a reader sets it per
    configuration: a buffer where ``configured`` has a buffer, else an attribute of the same Python type.
    """
    # TorchScript's own naming (``__torch__.<module>.<class>``) on both sides; torch has no public API for it.
    found = scripted._c._type().qualified_name()
    expected = torch._jit_internal._qualified_name(spec.module)
    differences = [f"class {found}, expected {expected}"] if found != expected else []
    differences += [f"no method {name}" for name in ("statistics", "reductions", "class_reductions")
                    if not isinstance(getattr(scripted, name, None), torch.ScriptMethod)]
    buffers = dict(scripted.named_buffers(recurse=False))
    eager_buffers = dict(configured.named_buffers(recurse=False))
    for param in spec.params:
        if param.name in eager_buffers:
            if param.name not in buffers:
                differences.append(f"no buffer {param.name}")
            continue
        kind = type(getattr(configured, param.name))
        if not hasattr(scripted, param.name) or type(getattr(scripted, param.name)) is not kind:
            differences.append(f"no {kind.__name__} attribute {param.name}")
    if differences:
        raise ArtifactError(f"{torchscript_file_name(spec)} is not the TorchScript module of {spec.name}: "
                            f"{'; '.join(differences)}{_fix('<the artifacts folder>')}")


def _differences(what: str, found: Sequence[Any], expected: Sequence[Any]) -> List[str]:
    r"""What ``found`` has and ``expected`` lacks and the reverse, or that only their order differs."""
    if list(found) == list(expected):
        return []
    unexpected = [item for item in found if item not in expected]
    missing = [item for item in expected if item not in found]
    if not unexpected and not missing:
        return [f"{what} in another order"]
    return [f"{what}: unexpected {unexpected}, missing {missing}"]


def _typed_shapes(values: Sequence[Dict[str, Any]]) -> List[Tuple[str, str, Tuple[Any, ...]]]:
    r"""``(name, dtype, shape)`` of graph inputs or outputs as :func:`.manifest.value_info` describes them."""
    return [(value["name"], value["dtype"], tuple(value["shape"])) for value in values]


def _fix(folder: "Path | str") -> str:
    return f"; re-export with `python -m loss_service.export --out {folder}`"
