r"""Write the inputs file that ``loss_trainer`` (and any C++ trainer) reads with ``torch::jit::load``.

Format: a TorchScript module without methods whose buffers are the tensors, saved with
``torch.jit.save``. C++ reads them with the stable TorchScript API only::

    torch::jit::Module inputs = torch::jit::load("inputs.pt");
    torch::Tensor predictions = inputs.attr("predictions").toTensor();

Reserved names: ``predictions`` and ``targets`` (required), ``weights`` (optional; absent means
``None``). Any other tensors (``tensors={"class_weight": ...}``) are extra named tensors that
``loss_trainer --set class_weight=class_weight`` assigns to a tensor hyperparameter.

A TorchScript container is used rather than ``torch.save`` + ``torch::pickle_load`` because
``torch::jit::load`` keeps every dtype (class indices stay int64), needs no pickle and is the API
a C++ trainer already uses for the loss itself.

Command line (random valid inputs for a registered loss, from its ``make_inputs``)::

    python deploy/cpp/write_inputs.py focal inputs.pt --batch 4 --classes 3 --spatial 8 8 \
        --weights per_sample --script-loss focal.pt
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional

import torch

RESERVED = ("predictions", "targets", "weights")


class _InputTensors(torch.nn.Module):
    r"""Holds the tensors as buffers; it has no forward, only attributes for C++ to read."""

    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)


def write_inputs(
    path: str,
    predictions: torch.Tensor,
    targets: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    tensors: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    r"""Save ``predictions``, ``targets``, optional ``weights`` and extra named ``tensors`` to ``path``.

    Shapes are those of the loss, e.g. ``(N, C, *)`` predictions; tensors are saved detached, on
    the CPU, with their dtype. ``ValueError`` if an argument is not a tensor or an extra name is
    reserved or not an identifier.
    """
    contents: Dict[str, torch.Tensor] = {}
    for name, value in (("predictions", predictions), ("targets", targets), ("weights", weights)):
        if value is None and name == "weights":
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        contents[name] = value
    for name, value in (tensors or {}).items():
        if name in RESERVED:
            raise ValueError(f"tensors: '{name}' is reserved for the {name} argument")
        if not name.isidentifier():
            raise ValueError(f"tensors: name '{name}' must be a Python identifier (C++ reads it with attr(name))")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"tensors['{name}'] must be a torch.Tensor, got {type(value).__name__}")
        contents[name] = value
    container = _InputTensors({k: v.detach().cpu().contiguous() for k, v in contents.items()})
    torch.jit.save(torch.jit.script(container), path)


def read_inputs(path: str) -> Dict[str, torch.Tensor]:
    r"""The tensors of an inputs file, by name (the inverse of :func:`write_inputs`)."""
    return dict(torch.jit.load(path).named_buffers())


_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def main(argv: Optional[list] = None) -> int:
    from loss_service import losses

    parser = argparse.ArgumentParser(description="Write random valid inputs of a registered loss for loss_trainer.")
    parser.add_argument("loss", help="registered loss name: " + ", ".join(losses.names()))
    parser.add_argument("output", help="inputs file to write (.pt)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--spatial", type=int, nargs="*", default=[8, 8])
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=("none", "per_sample"), default="none",
                        help="per_sample: one random weight in [0.1, 1.1) per sample")
    parser.add_argument("--script-loss", metavar="PATH",
                        help="also write torch.jit.script(losses.build(loss)) to PATH (what python -m loss_service.export writes)")
    args = parser.parse_args(argv)
    try:
        spec = losses.get(args.loss)
        if args.batch < 1 or args.classes < 1 or any(size < 1 for size in args.spatial):
            raise ValueError("--batch, --classes and --spatial sizes must be positive")
        generator = torch.Generator().manual_seed(args.seed)
        dtype = _DTYPES[args.dtype]
        predictions, targets = spec.make_inputs(args.batch, args.classes, tuple(args.spatial), generator, dtype, {})
        weights = None
        if args.weights == "per_sample":
            weights = torch.rand(args.batch, generator=generator, dtype=dtype) + 0.1
        write_inputs(args.output, predictions, targets, weights)
        if args.script_loss:
            torch.jit.save(torch.jit.script(losses.build(args.loss)), args.script_loss)
    except ValueError as error:
        print(f"write_inputs: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
