r"""Writing the two artifacts of a loss: ``<loss>.pt`` (TorchScript) and ``<loss>[--variant].onnx``.

TorchScript: ``torch.jit.script(losses.build(name))`` with the default hyperparameters; every
hyperparameter is a typed attribute (tensors are buffers) that C++ changes with
``module.setattr(name, value)`` without re-exporting.

ONNX: the loss's statistics and reductions kernels wrapped in :class:`CanonicalLossGraph` and
exported with ``torch.onnx.export(..., dynamo=True)`` on the canonical layout of
:mod:`loss_service.layout`, every ``graph_input=True`` hyperparameter being a graph input; the
model metadata names the loss and variant (:func:`onnx_identity`).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from loss_service import layout, losses
from loss_service.losses import LossSpec

DEFAULT_OPSET = 20
# Sizes of the example inputs the graphs are traced with; verification uses other sizes so that a
# dimension specialised by mistake is caught. All distinct and > 1 (torch.export specialises 0 and 1).
EXPORT_BATCH, EXPORT_CLASSES, EXPORT_SPATIAL = 2, 4, 6


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    r"""Silence TorchScript deprecation warnings and the ONNX exporter's chatter (CLI output stays readable)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def torchscript_file_name(spec: LossSpec) -> str:
    return f"{spec.name}.pt"


def export_torchscript(spec: LossSpec, path: Path) -> None:
    r"""Script the default-configured module and save it (``torch.jit.save``).

    The bytes are reproducible for a given file name and torch version: the archive's root folder is
    the file's stem and its serialization id is derived from the content.
    """
    with quiet():
        scripted = torch.jit.script(losses.build(spec.name))
        torch.jit.save(scripted, str(path))


def _reductions_arguments(spec: LossSpec) -> List[str]:
    r"""The hyperparameters the reductions kernel takes by name (everything after ``totals``)."""
    return list(inspect.signature(spec.reductions_kernel).parameters)[1:]


class CanonicalLossGraph(nn.Module):
    r"""The module that becomes an ONNX graph: one loss on the canonical layout.

    ``forward(predictions, targets, weights, [sample_weights,] *hyperparameters, reduction)`` with
    the inputs of :func:`loss_service.layout.onnx_input_names` returns
    ``(loss, values, totals, sample_totals, class_totals)``:

    .. math::
        \mathrm{loss} = \begin{cases}
            \mathrm{mean} & \text{code} = 1 \\ \mathrm{weighted\_mean} & \text{code} = 3 \\
            \mathrm{sum} & \text{otherwise (sum, and none, whose values are the } \texttt{values} \text{ output)}
        \end{cases}

    the columns of ``reductions_kernel(totals)``. Structural (``graph_input=False``) settings of the
    variant are fixed Python values; ``class_dim`` is 1 (the layout moves the classes there).

    The loss's ``constants`` are fixed arguments (numbers as 0-d float64 tensors). Losses with
    ``pixel_weights`` (region losses) get the full-shape pixel ``weights`` and the ``(N,)``
    ``sample_weights`` as two inputs: torch.export cannot trace one input that is ``(N,)`` for some
    requests and full-shape for others.
    """

    def __init__(self, spec: LossSpec, variant: Dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.hyperparameters = [p.name for p in layout.graph_params(spec)]
        fixed = {p.name: spec.defaults()[p.name] for p in layout.structural_params(spec)}
        fixed.update(layout.structural_settings(spec, variant))
        if "class_dim" in spec.param_names():
            fixed["class_dim"] = 1
        self.fixed = fixed
        self.constants = {
            name: None if value is None else torch.tensor(value, dtype=torch.float64)
            for name, value in spec.constants.items()
        }
        self.reduction_arguments = _reductions_arguments(spec)
        self.weight_inputs = len(layout.weight_input_names(spec))

    def forward(self, *inputs: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        predictions, targets = inputs[0], inputs[1]
        weight_inputs = inputs[2:2 + self.weight_inputs]
        reduction = inputs[-1]
        arguments: Dict[str, Any] = dict(self.fixed, **self.constants)
        arguments.update(zip(self.hyperparameters, inputs[2 + self.weight_inputs:-1]))
        values, totals, sample_totals = self.spec.statistics_kernel(
            predictions, targets, *weight_inputs, per_sample=True, **arguments
        )
        # The kernel gives one breakdown per call; ONNX Runtime merges what the two calls share.
        _, _, class_totals = self.spec.statistics_kernel(
            predictions, targets, *weight_inputs, per_sample=False, per_class=True, **arguments
        )
        reductions = self.spec.reductions_kernel(totals, **{k: arguments[k] for k in self.reduction_arguments})
        loss = torch.where(
            reduction == layout.REDUCTION_CODES["mean"],
            reductions[1],
            torch.where(reduction == layout.REDUCTION_CODES["weighted_mean"], reductions[2], reductions[0]),
        )
        return loss, values, totals, sample_totals, class_totals


def example_feeds(spec: LossSpec, variant: Dict[str, Any]) -> Dict[str, Any]:
    r"""Canonical feeds (as torch tensors) the graph is traced with: the variant's default parameters."""
    generator = torch.Generator().manual_seed(0)
    predictions, targets = layout.example_inputs(
        spec, variant, EXPORT_BATCH, EXPORT_CLASSES, (EXPORT_SPATIAL,), generator, torch.float32
    )
    feeds, _ = layout.to_canonical(spec, layout.variant_params(spec, variant), predictions, targets, None)
    return {name: torch.from_numpy(array) for name, array in feeds.items()}


def _dynamic_axes(shape: Tuple[int, ...]) -> Optional[Dict[int, Any]]:
    r"""Name every axis by its example size: N, C and S have distinct sizes in the example."""
    dims = {
        EXPORT_BATCH: torch.export.Dim("N"),
        EXPORT_CLASSES: torch.export.Dim("C"),
        EXPORT_SPATIAL: torch.export.Dim("S"),
    }
    axes = {axis: dims[size] for axis, size in enumerate(shape) if size in dims}
    return axes or None


def onnx_identity(spec: LossSpec, variant: Dict[str, Any]) -> Dict[str, str]:
    r"""The model metadata (``metadata_props``) by which a graph says which loss and variant it computes.

    Graphs of different losses or variants often have the same inputs and outputs (``dice.onnx`` and
    ``iou.onnx``; ``dice.onnx`` and ``dice--mode=multilabel.onnx``), so the server tells them apart
    by these entries (:func:`.folder.check_graph`).
    """
    return {"loss_service.loss": spec.name, "loss_service.variant": layout.variant_key(variant)}


def export_onnx(spec: LossSpec, variant: Dict[str, Any], path: Path, opset: int = DEFAULT_OPSET) -> None:
    r"""Trace the canonical graph of ``spec``/``variant`` with the dynamo exporter and save it, with
    its :func:`onnx_identity` in the model metadata."""
    feeds = example_feeds(spec, variant)
    names = layout.onnx_input_names(spec)
    args = tuple(feeds[name] for name in names)
    # Size-based naming shares one symbol between e.g. predictions' C and class_weight's length.
    dynamic = {"inputs": tuple(_dynamic_axes(tuple(arg.shape)) for arg in args)}
    with quiet():
        program = torch.onnx.export(
            CanonicalLossGraph(spec, variant),
            args,
            dynamo=True,
            input_names=names,
            output_names=layout.ONNX_OUTPUTS,
            dynamic_shapes=dynamic,
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
        if program is None:
            raise RuntimeError(f"{spec.name}: torch.onnx.export returned no program")
        program.model.metadata_props.update(onnx_identity(spec, variant))
        tmp = path.with_suffix(path.suffix + ".tmp")
        program.save(str(tmp))
        os.replace(tmp, path)
