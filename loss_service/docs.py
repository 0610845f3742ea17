r"""Render the loss reference (``docs/reference.md``) from the registry.

``python -m loss_service.docs > docs/reference.md`` regenerates it; a test fails when the committed
file and the registry disagree, so the parameter tables cannot drift from the code.
"""
from __future__ import annotations

from typing import Any, List

import torch

from . import losses


def _default_text(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return str(value.tolist())
    return repr(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_reference() -> str:
    lines: List[str] = [
        "# Loss reference (generated)",
        "",
        "Generated from the registry by `python -m loss_service.docs > docs/reference.md`; do not edit by hand.",
        "Formulas, reduction rules and deliberate differences from other libraries are in",
        "[losses.md](losses.md) and the family pages it links.",
        "",
        "| loss | summary | predictions | targets | must equal |",
        "|---|---|---|---|---|",
    ]
    for spec in losses.specs():
        lines.append(
            f"| [`{spec.name}`](#{spec.name}) | {_escape(spec.summary)} | {spec.predictions} `{spec.prediction_shape}` "
            f"| {spec.targets} `{_escape(spec.target_shape)}` | {_escape(spec.reference)} |"
        )
    for spec in losses.specs():
        lines += [
            "",
            f"## {spec.name}",
            "",
            f"{spec.summary}. Family: `{spec.family}`; statistics: `{spec.kind}`.",
            "",
            f"- predictions: {spec.predictions}, shape `{spec.prediction_shape}`",
            f"- targets: {spec.targets}, shape `{_escape(spec.target_shape)}`",
            f"- must equal: {spec.reference}",
        ]
        if spec.paper:
            lines.append(f"- paper: {spec.paper}")
        lines += [
            "",
            "| parameter | kind | default | valid | ONNX graph input | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for param in spec.params:
            lines.append(
                f"| `{param.name}` | {param.kind} | `{_escape(_default_text(param.default))}` | {_escape(param.range_text())} "
                f"| {'yes' if param.graph_input and param.name != 'reduction' else 'no'} | {_escape(param.doc)} |"
            )
        if spec.notes:
            lines += ["", spec.notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
