r"""Every loss that has a peer equivalent, timed against that peer in one process and one run.

Usage (from the repository root, venv active, ``pip install -e .[bench]`` for kornia and smp)::

    python bench/bench_peers.py                                  # 1e4, 1e6, 1e7 elements; 1 and 2 threads
    python bench/bench_peers.py --sizes 1e6 --threads 1 --repeats 7 --cases dice-monai focal-kornia
    python bench/bench_peers.py --json peers.json                # also every number as JSON
    python bench/bench_peers.py --ops --sizes 1e4                # ops and µs per call of each, no timed rounds

The peers are what a user would pick instead: ``torch.nn.functional``, torchvision's
``sigmoid_focal_loss`` formula written out (so torchvision is not needed), MONAI, kornia and
segmentation_models_pytorch (smp's losses are loaded without its encoders, whose torchvision
import needs the CUDA build on a CPU-only torch). A peer that is not installed is left out and
named in the output.

Each case is one of our losses, configured to a peer's convention, and the peers that compute the
same number. Before timing, every peer's value must equal ours in float64 (relative difference
≤ 1e-6), else the run stops: the table compares equal computations. Each float32 value's error
against that float64 reference is stored, and printed where it exceeds 1e-5. Then, per size and thread
count, the implementations are timed round by round, interleaved, forward without grad and
forward+backward (``torch.autograd.grad`` of the loss with respect to the predictions), and the
table prints medians and ``ours ÷ fastest peer``. A call on fewer than 1e5 elements is too short to
time alone: one sample there is the mean of ``1e5 / elements`` calls.

``ours compiled`` is our module under ``torch.compile(module, fullgraph=True, dynamic=True)``
(compiled once per case, outside the timed rounds); a graph break fails the compile and the column
says so. ``--no-compiled`` skips it.

Peak extra memory (``--memory``, on by default at the largest size): for each implementation a
fresh child process builds the inputs, resets its peak RSS (``/proc/self/clear_refs``), runs one
forward+backward and reports ``VmHWM - VmRSS``: everything the call allocated at its peak
(``tracemalloc`` cannot see torch's allocations).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loss_service import losses  # noqa: E402

CLASSES = 4
SIDE = 64
GAMMA = 2.0
# Below this many elements one call is too short to time alone (see the module docstring).
BATCHED_BELOW = 100_000
# Relative difference of float64 values under which two implementations compute the same loss; not
# tighter, as some peers compute in float32 whatever the input (MONAI's FocalLoss casts to float).
SAME_IN_FLOAT64 = 1e-6
# The accuracy bar for a float32 result against the float64 reference.
FLOAT32_ACCURACY = 1e-5
# torch.profiler's name of the event around each backward node the autograd engine runs.
BACKWARD_NODE = "autograd::engine::evaluate_function"
Inputs = Tuple[torch.Tensor, torch.Tensor]
LossCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def binary_rows(elements: int, generator: torch.Generator) -> Inputs:
    r"""Logits ``(E/4, 4)`` (classes along the last dim, as the service benchmark) and a 0/1 mask."""
    shape = (elements // CLASSES, CLASSES)
    return torch.randn(shape, generator=generator) * 3, (torch.rand(shape, generator=generator) < 0.3).float()


def image_shape(elements: int) -> Tuple[int, int, int, int]:
    r"""``(N, 4, S, S)`` with about ``elements`` entries: ``S = 64`` from 1e5 up, smaller below."""
    side = min(SIDE, int(math.sqrt(elements / CLASSES)))
    return max(1, elements // (CLASSES * side * side)), CLASSES, side, side


def probability_rows(elements: int, generator: torch.Generator) -> Inputs:
    logits, mask = binary_rows(elements, generator)
    return torch.sigmoid(logits), mask


def real_rows(elements: int, generator: torch.Generator) -> Inputs:
    shape = (elements // CLASSES, CLASSES)
    return torch.randn(shape, generator=generator) * 2, torch.randn(shape, generator=generator) * 2


def class_images(elements: int, generator: torch.Generator) -> Inputs:
    r"""Logits ``(N, 4, S, S)`` and class indices ``(N, S, S)``: every class present in every image."""
    n, c, side, _ = image_shape(elements)
    return (torch.randn((n, c, side, side), generator=generator) * 2,
            torch.randint(0, c, (n, side, side), generator=generator))


def class_rows(elements: int, generator: torch.Generator) -> Inputs:
    r"""Logits ``(E/4, 4)`` and class indices ``(E/4,)``."""
    logits, _ = binary_rows(elements, generator)
    return logits, torch.randint(0, CLASSES, (logits.shape[0],), generator=generator)


def log_probability_images(elements: int, generator: torch.Generator) -> Inputs:
    logits, targets = class_images(elements, generator)
    return torch.log_softmax(logits, dim=1), targets


def binary_images(elements: int, generator: torch.Generator) -> Inputs:
    n, c, side, _ = image_shape(elements)
    logits = torch.randn((n * c, 1, side, side), generator=generator) * 2
    return logits, (torch.rand(logits.shape, generator=generator) < 0.3).float()


def torchvision_sigmoid_focal(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                              gamma: float = GAMMA) -> torch.Tensor:
    r"""torchvision.ops.sigmoid_focal_loss(reduction="mean"), its published formula written out."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * loss).mean()


def smp_losses() -> Optional[types.ModuleType]:
    r"""``segmentation_models_pytorch.losses``, imported without the package's encoders when those fail."""
    try:
        return importlib.import_module("segmentation_models_pytorch.losses")
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - smp's encoders import torchvision, which fails without CUDA here
        for name in [key for key in sys.modules if key.startswith("segmentation_models_pytorch")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("segmentation_models_pytorch")
    package = types.ModuleType("segmentation_models_pytorch")
    package.__path__ = list(spec.submodule_search_locations or [])
    sys.modules["segmentation_models_pytorch"] = package
    return importlib.import_module("segmentation_models_pytorch.losses")


def optional(name: str) -> Optional[types.ModuleType]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class PerDtype:
    r"""A tensor in the dtype of the tensor it is called with, each dtype converted once."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.by_dtype = {tensor.dtype: tensor}

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.dtype not in self.by_dtype:
            self.by_dtype[like.dtype] = self.by_dtype[next(iter(self.by_dtype))].to(like.dtype)
        return self.by_dtype[like.dtype]


@dataclass
class Case:
    r"""One row: our loss in a peer's convention, the inputs, and the peers that compute the same number."""

    name: str
    loss: str
    params: Dict[str, object]
    inputs: Callable[[int, torch.Generator], Inputs]
    peers: Dict[str, LossCall]


def cases() -> Tuple[List[Case], List[str]]:
    r"""The cases whose peers are installed, and the peers that are not."""
    monai_losses, kornia_losses, smp = optional("monai.losses"), optional("kornia.losses"), smp_losses()
    missing = [name for name, module in (("monai", monai_losses), ("kornia", kornia_losses), ("smp", smp))
               if module is None]
    pos_weight = torch.tensor([3.0, 0.5, 1.0, 2.0])
    class_weight = torch.tensor([0.5, 2.0, 1.0, 1.5])
    # The peers' vectors in the inputs' dtype (float32 timed, float64 for the reference), converted once.
    pos_weight_as, class_weight_as = PerDtype(pos_weight), PerDtype(class_weight)
    found: List[Case] = [
        Case("bce_with_logits+pos_weight", "bce_with_logits", {"pos_weight": pos_weight}, binary_rows, {
            "F": lambda p, t: F.binary_cross_entropy_with_logits(p, t, pos_weight=pos_weight_as(p)),
        }),
        Case("bce", "bce", {}, probability_rows, {"F": F.binary_cross_entropy}),
        Case("binary_focal", "binary_focal", {"alpha": 0.25, "gamma": GAMMA}, binary_rows, {
            "torchvision formula": torchvision_sigmoid_focal,
        }),
        Case("cross_entropy+class_weight", "cross_entropy", {"class_weight": class_weight}, class_images, {
            "F": lambda p, t: F.cross_entropy(p, t, weight=class_weight_as(p)),
        }),
        # The service benchmark's layout: classes along the last (short) dimension.
        Case("cross_entropy+class_weight rows", "cross_entropy", {"class_weight": class_weight}, class_rows, {
            "F": lambda p, t: F.cross_entropy(p, t, weight=class_weight_as(p)),
        }),
        Case("nll", "nll", {}, log_probability_images, {"F": F.nll_loss}),
        Case("mse", "mse", {}, real_rows, {"F": F.mse_loss}),
        Case("l1", "l1", {}, real_rows, {"F": F.l1_loss}),
        Case("huber", "huber", {"delta": 0.5}, real_rows, {"F": lambda p, t: F.huber_loss(p, t, delta=0.5)}),
        Case("smooth_l1", "smooth_l1", {"beta": 0.5}, real_rows,
             {"F": lambda p, t: F.smooth_l1_loss(p, t, beta=0.5)}),
    ]
    # Peers that join a case above.
    cases_by_name = {case.name: case for case in found}
    multiclass = {"mode": "multiclass"}
    unsmoothed = dict(multiclass, smooth_nr=0.0, smooth_dr=0.0)
    if monai_losses is not None:
        m = monai_losses
        dice = m.DiceLoss(softmax=True, to_onehot_y=True)
        jaccard = m.DiceLoss(softmax=True, to_onehot_y=True, jaccard=True, smooth_nr=0.0, smooth_dr=0.0)
        tversky = m.TverskyLoss(softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7)
        dice_ce = m.DiceCELoss(sigmoid=True)
        generalized_dice = m.GeneralizedDiceLoss(softmax=True, to_onehot_y=True)
        monai_focal = m.FocalLoss(use_softmax=True, to_onehot_y=True, gamma=GAMMA)
        found += [
            Case("dice multiclass (MONAI)", "dice", multiclass, class_images,
                 {"MONAI": lambda p, t: dice(p, t.unsqueeze(1))}),
            Case("iou multiclass (MONAI)", "iou", unsmoothed, class_images,
                 {"MONAI": lambda p, t: jaccard(p, t.unsqueeze(1))}),
            Case("tversky multiclass (MONAI)", "tversky", dict(multiclass, alpha=0.3, beta=0.7), class_images,
                 {"MONAI": lambda p, t: tversky(p, t.unsqueeze(1))}),
            Case("bce_dice binary (MONAI)", "bce_dice", {}, binary_images, {"MONAI": dice_ce}),
            Case("generalized_dice multiclass (MONAI)", "generalized_dice", multiclass, class_images,
                 {"MONAI": lambda p, t: generalized_dice(p, t.unsqueeze(1))}),
            # MONAI's mean runs over every (n, c, position), the zero entries of other classes included.
            Case("focal (MONAI)", "focal", {"gamma": GAMMA}, class_images,
                 {"MONAI": lambda p, t: monai_focal(p, t.unsqueeze(1)) * CLASSES}),
        ]
    if kornia_losses is not None:
        k = kornia_losses
        cases_by_name["binary_focal"].peers["kornia"] = lambda p, t: k.binary_focal_loss_with_logits(p, t, 0.25, GAMMA, "mean")
        found += [
            # kornia's mean, like MONAI's, runs over the classes too.
            Case("focal (kornia)", "focal", {"gamma": GAMMA}, class_images,
                 {"kornia": lambda p, t: k.focal_loss(p, t, None, GAMMA, "mean") * CLASSES}),
            Case("dice multiclass eps (kornia)", "dice", dict(multiclass, smooth_nr=0.0, smooth_dr=1e-8),
                 class_images, {"kornia": lambda p, t: k.dice_loss(p, t, average="macro")}),
            # kornia's default, micro: one Dice per sample over every class, uniform weights.
            Case("dice micro (kornia)", "generalized_dice",
                 dict(multiclass, weight_exponent=0.0, smooth_nr=0.0, smooth_dr=1e-8), class_images,
                 {"kornia": lambda p, t: k.dice_loss(p, t, average="micro")}),
        ]
    if smp is not None:
        smp_dice = smp.DiceLoss("multiclass", smooth=0.0, eps=0.0)
        smp_jaccard = smp.JaccardLoss("multiclass", smooth=0.0, eps=0.0)
        smp_focal = smp.FocalLoss("binary", alpha=0.25, gamma=GAMMA)
        cases_by_name["binary_focal"].peers["smp"] = smp_focal
        cases_by_name["bce_with_logits+pos_weight"].peers["smp"] = smp.SoftBCEWithLogitsLoss(pos_weight=pos_weight)
        batch = dict(unsmoothed, batch=True)
        found += [
            Case("dice multiclass batch (smp)", "dice", batch, class_images, {"smp": smp_dice}),
            Case("iou multiclass batch (smp)", "iou", batch, class_images, {"smp": smp_jaccard}),
        ]
    return found, missing


@dataclass
class Implementation:
    name: str
    call: LossCall
    is_ours: bool


def implementations(case: Case, compiled: bool) -> Tuple[List[Implementation], str]:
    r"""Ours, ours compiled (or why not), then the peers."""
    module = losses.build(case.loss, **case.params)
    # Every loss module shares Loss.forward: without a reset, dynamo's per-code recompile limit
    # would count the cases before this one. Each size and grad mode may take a graph of its own
    # (fullgraph=True still fails on any graph break).
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = 64
    found = [Implementation("ours", module, True)]
    note = ""
    if compiled:
        candidate = torch.compile(module, fullgraph=True, dynamic=True)
        try:
            candidate(*case.inputs(4 * 64, torch.Generator().manual_seed(1)))
            found.append(Implementation("ours compiled", candidate, True))
        except Exception as error:  # noqa: BLE001 - the table reports why the compile failed
            note = compile_failure(error)
    found += [Implementation(name, call, False) for name, call in case.peers.items()]
    return found, note


def check_agreement(case: Case, found: List[Implementation], inputs: Inputs) -> Tuple[str, Dict[str, float]]:
    r"""Stop unless every implementation computes our loss; return why ``ours compiled`` was dropped (if it
    failed) and each implementation's float32 error relative to the float64 reference.

    "The same computation" is judged in float64, where rounding cannot hide a different formula: every
    peer's float64 value must equal ours within :data:`SAME_IN_FLOAT64`. The float32 values are then
    measured against that reference (a float32 sum over millions of elements can be off by far more than
    its inputs' rounding) and reported, not required to agree.
    """
    predictions, targets = inputs
    wide = (predictions.double(), targets.double() if targets.is_floating_point() else targets)
    errors: Dict[str, float] = {}
    note = ""
    with torch.no_grad():
        # A module's buffers (a class weight, a pos_weight) follow it to float64 in a copy.
        reference = {
            impl.name: float((copy.deepcopy(impl.call).double() if isinstance(impl.call, torch.nn.Module)
                              else impl.call)(*wide))
            for impl in found if impl.name != "ours compiled"
        }
        for impl in list(found):
            try:
                value = float(impl.call(*inputs))
            except Exception as error:  # noqa: BLE001 - only a compiled module's failure is reported, not raised
                if impl.name != "ours compiled":
                    raise
                found.remove(impl)
                note = compile_failure(error)
                continue
            errors[impl.name] = abs(value - reference["ours"]) / max(abs(reference["ours"]), 1e-12)
    ours = reference["ours"]
    for name, value in reference.items():
        if not abs(value - ours) <= SAME_IN_FLOAT64 * max(abs(ours), 1e-12):
            raise SystemExit(f"{case.name}: {name} gives {value!r} in float64, ours {ours!r}: not the same computation")
    return note, errors


def compile_failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"


def _call(call: LossCall, inputs: Inputs, backward: bool) -> None:
    predictions, targets = inputs
    if backward:
        torch.autograd.grad(call(predictions, targets), predictions)
    else:
        with torch.no_grad():
            call(predictions, targets)


def _timed(call: LossCall, inputs: Inputs, backward: bool, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        _call(call, inputs, backward)
    return (time.perf_counter() - start) * 1e3 / calls


def time_case(found: Sequence[Implementation], inputs: Inputs, repeats: int) -> Dict[str, Dict[str, float]]:
    r"""Median ms per call of each implementation, ``{"fwd": ..., "fwd+bwd": ...}``, interleaved."""
    leaf = inputs[0].detach().clone().requires_grad_(True)
    per_sample = max(1, BATCHED_BELOW // inputs[0].numel())
    times: Dict[str, Dict[str, List[float]]] = {impl.name: {"fwd": [], "fwd+bwd": []} for impl in found}
    for round_index in range(repeats + 1):
        order = found if round_index % 2 else list(reversed(found))
        for mode, backward, data in (("fwd", False, inputs), ("fwd+bwd", True, (leaf, inputs[1]))):
            for impl in order:
                times[impl.name][mode].append(_timed(impl.call, data, backward, per_sample))
    # Round 0 is the warm-up.
    return {name: {mode: statistics.median(values[1:]) for mode, values in by_mode.items()}
            for name, by_mode in times.items()}


def peak_memory(case_name: str, implementation: str, elements: int) -> Optional[int]:
    r"""Peak extra RSS of one forward+backward of ``implementation`` in a fresh child process, in bytes."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", case_name, implementation,
               str(elements)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        print(f"  memory of {implementation} on {case_name} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return int(done.stdout.split()[-1])


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(case_name: str, implementation: str, elements: int) -> int:
    torch.set_num_threads(1)
    case = {case.name: case for case in cases()[0]}[case_name]
    found = {impl.name: impl for impl in implementations(case, implementation == "ours compiled")[0]}
    predictions, targets = case.inputs(elements, torch.Generator().manual_seed(0))
    leaf = predictions.requires_grad_(True)
    call = found[implementation].call
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    torch.autograd.grad(call(leaf, targets), leaf)
    return _status("VmHWM") - before


def parse_size(text: str) -> int:
    value = int(float(text))
    if value < 4 * CLASSES:
        raise argparse.ArgumentTypeError(f"a size must be at least {4 * CLASSES} elements, got {text}")
    return value


def selected_cases(names: Optional[Sequence[str]]) -> Tuple[List[Case], List[str]]:
    r"""The cases named (every case for ``None``) and the peers not installed."""
    found_cases, missing = cases()
    if names:
        unknown = sorted(set(names) - {case.name for case in found_cases})
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; these exist: {[case.name for case in found_cases]}")
        found_cases = [case for case in found_cases if case.name in names]
    return found_cases, missing


def _top_level(event: torch.autograd.profiler_util.FunctionEvent) -> bool:
    r"""An aten op dispatched from Python, or a backward node the autograd engine runs (not called by another)."""
    return event.cpu_parent is None and (event.name.startswith("aten::") or event.name.startswith(BACKWARD_NODE))


def op_profile(call: LossCall, inputs: Inputs, backward: bool, calls: int) -> Tuple[int, float]:
    r"""One forward (``backward``: forward+backward) of ``call``: its top-level aten ops and backward nodes
    (:func:`_top_level`, counted by ``torch.profiler``) and the µs of the whole call, timed without the profiler
    (the least of three means over ``calls`` calls; the profiler's own cost per op would count in its times). On a
    small batch each op costs more than its arithmetic."""
    _call(call, inputs, backward)
    with torch.profiler.profile() as profiled:
        _call(call, inputs, backward)
    ops = sum(1 for event in profiled.events() if _top_level(event))
    return ops, min(_timed(call, inputs, backward, calls) for _ in range(3)) * 1e3


def op_profiles(args: argparse.Namespace) -> List[Dict[str, object]]:
    r"""``--ops``: :func:`op_profile` of each implementation per case and size, forward and forward+backward, on
    one thread, instead of the timed rounds."""
    found_cases, _ = selected_cases(args.cases)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("1 thread; ops: top-level aten ops (and backward nodes) of one call; µs: per call")
    print("| case | elements | implementation | fwd ops | fwd µs | fwd+bwd ops | fwd+bwd µs |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    results: List[Dict[str, object]] = []
    for case in found_cases:
        found, _ = implementations(case, False)
        for elements in args.sizes:
            inputs = case.inputs(elements, torch.Generator().manual_seed(elements))
            leaf = (inputs[0].detach().clone().requires_grad_(True), inputs[1])
            calls = max(1, BATCHED_BELOW // inputs[0].numel())
            for impl in found:
                forward_ops, forward_us = op_profile(impl.call, inputs, False, calls)
                both_ops, both_us = op_profile(impl.call, leaf, True, calls)
                print(f"| {case.name} | {inputs[0].numel():.0e} | {impl.name} | {forward_ops} | {forward_us:.0f} | "
                      f"{both_ops} | {both_us:.0f} |", flush=True)
                results.append({
                    "case": case.name, "elements": inputs[0].numel(), "implementation": impl.name,
                    "fwd_ops": forward_ops, "fwd_us": forward_us, "fwd+bwd_ops": both_ops, "fwd+bwd_us": both_us,
                })
    torch.set_num_threads(threads)
    return results


def run(args: argparse.Namespace) -> List[Dict[str, object]]:
    found_cases, missing = selected_cases(args.cases)
    print(f"torch {torch.__version__}; peers not installed: {', '.join(missing) or 'none'}; median of "
          f"{args.repeats} interleaved rounds; float32; ms per call")
    results: List[Dict[str, object]] = []
    header = ("| case | elements | threads | ours fwd | ours fwd+bwd | fastest peer (fwd / fwd+bwd) | peer fwd "
              "| peer fwd+bwd | ours÷peer fwd | ours÷peer fwd+bwd | compiled÷peer fwd | compiled÷peer fwd+bwd |")
    print(header + "\n|" + "---|" * (header.count("|") - 1), flush=True)
    for case in found_cases:
        found, compile_note = implementations(case, args.compiled)
        for elements in args.sizes:
            inputs = case.inputs(elements, torch.Generator().manual_seed(elements))
            failure, errors = check_agreement(case, found, inputs)
            compile_note = failure or compile_note
            inaccurate = {name: error for name, error in errors.items() if error > FLOAT32_ACCURACY}
            if inaccurate:
                print(f"  {case.name} at {inputs[0].numel():.0e}: float32 relative error above "
                      f"{FLOAT32_ACCURACY:.0e}: {', '.join(f'{n} {e:.1e}' for n, e in inaccurate.items())}", flush=True)
            if compile_note and not any(impl.name == "ours compiled" for impl in found):
                print(f"  {case.name}: torch.compile(fullgraph=True) fails: {compile_note}", flush=True)
            for threads in args.threads:
                torch.set_num_threads(threads)
                try:
                    times = time_case(found, inputs, args.repeats)
                except Exception as error:  # noqa: BLE001 - a compiled module that fails here is dropped
                    compiled = [impl for impl in found if impl.name == "ours compiled"]
                    if not compiled:
                        raise
                    found.remove(compiled[0])
                    compile_note = compile_failure(error)
                    print(f"  {case.name}: torch.compile(fullgraph=True) fails: {compile_note}", flush=True)
                    times = time_case(found, inputs, args.repeats)
                results.append(row(case, elements, inputs[0].numel(), threads, times, found, compile_note, errors))
    if args.memory:
        largest = max(args.sizes)
        print(f"\nPeak extra memory of one forward+backward at {largest:.0e} elements, fresh process, MB:")
        print("| case | " + " | ".join(["ours", "ours compiled", "peers"]) + " | ours÷smallest peer |\n|---|---|---|---|---|")
        for case in found_cases:
            names = ["ours"] + (["ours compiled"] if args.compiled else []) + list(case.peers)
            peaks = {name: peak_memory(case.name, name, largest) for name in names}
            memory_row(case, peaks, results, largest)
    torch.set_num_threads(args.threads[0])
    return results


def _ratio(numerator: Optional[float], denominator: float) -> str:
    return "-" if numerator is None else f"{numerator / denominator:.2f}"


def row(case: Case, elements: int, actual: int, threads: int, times: Dict[str, Dict[str, float]],
        found: Sequence[Implementation], compile_note: str, errors: Dict[str, float]) -> Dict[str, object]:
    peers = {impl.name: times[impl.name] for impl in found if not impl.is_ours}
    fastest = {mode: min(peers, key=lambda name: peers[name][mode]) for mode in ("fwd", "fwd+bwd")}
    peer = {mode: peers[fastest[mode]][mode] for mode in fastest}
    ours = times["ours"]
    compiled = times.get("ours compiled", {})
    print(f"| {case.name} | {actual:.0e} | {threads} | {ours['fwd']:.3f} | {ours['fwd+bwd']:.3f} | "
          f"{fastest['fwd']} / {fastest['fwd+bwd']} | {peer['fwd']:.3f} | {peer['fwd+bwd']:.3f} | "
          f"{ours['fwd'] / peer['fwd']:.2f} | {ours['fwd+bwd'] / peer['fwd+bwd']:.2f} | "
          f"{_ratio(compiled.get('fwd'), peer['fwd'])} | {_ratio(compiled.get('fwd+bwd'), peer['fwd+bwd'])} |",
          flush=True)
    return {"case": case.name, "elements": actual, "requested": elements, "threads": threads, "times_ms": times,
            "fastest_peer": fastest, "ours_over_peer": {mode: ours[mode] / peer[mode] for mode in peer},
            "compile_error": compile_note, "float32_relative_error": errors}


def memory_row(case: Case, peaks: Dict[str, Optional[int]], results: List[Dict[str, object]], elements: int) -> None:
    def megabytes(name: str) -> str:
        value = peaks.get(name)
        return "-" if value is None else f"{value / 2**20:.0f}"

    peer_peaks = {name: value for name, value in peaks.items() if name in case.peers and value is not None}
    smallest = min(peer_peaks.values()) if peer_peaks else None
    ratio = "-" if smallest is None or peaks["ours"] is None else f"{peaks['ours'] / smallest:.2f}"
    peer_text = ", ".join(f"{name} {megabytes(name)}" for name in case.peers)
    print(f"| {case.name} | {megabytes('ours')} | {megabytes('ours compiled')} | {peer_text} | {ratio} |", flush=True)
    results.append({"case": case.name, "memory_elements": elements, "peak_bytes": peaks})


def median_of_runs(runs: Sequence[List[Dict[str, object]]]) -> str:
    r"""The issue's measure over several runs' ``--json`` results: for every (case, elements, threads) timed in
    all of them, the median of ours ÷ fastest peer per mode with each run's value; the rows at or under 1.0 by
    size; and the median peak-memory ratio per case. Markdown."""
    keyed = [{(r["case"], r["elements"], r["threads"]): r for r in run if "times_ms" in r} for run in runs]
    keys = [key for key in keyed[-1] if all(key in run for run in keyed)]
    lines = [
        "| case | elements | threads | ours ÷ peer fwd: median (each run) | fwd+bwd: median (each run) |",
        "|---|---:|---:|---|---|",
    ]
    met: Dict[Tuple[str, str], List[int]] = {}
    for key in keys:
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            values = [float(run[key]["ours_over_peer"][mode]) for run in keyed]
            median = statistics.median(values)
            size = f"~1e{round(math.log10(key[1]))}"
            counts = met.setdefault((size, mode), [0, 0])
            counts[0] += median <= 1.0
            counts[1] += 1
            cells.append(f"**{median:.2f}** ({' / '.join(f'{v:.2f}' for v in values)})")
        lines.append(f"| {key[0]} | {key[1]:.0e} | {key[2]} | {cells[0]} | {cells[1]} |")
    lines += ["", "| size | fwd at or under 1.0 | fwd+bwd at or under 1.0 |", "|---|---|---|"]
    for size in sorted({size for size, _ in met}):
        fwd, both = met[(size, "fwd")], met[(size, "fwd+bwd")]
        lines.append(f"| {size} | {fwd[0]} of {fwd[1]} | {both[0]} of {both[1]} |")
    memory = [{r["case"]: r["peak_bytes"] for r in run if "peak_bytes" in r} for run in runs]
    lines += ["", "| case | peak memory, ours ÷ smallest peer: median (each run) |", "|---|---|"]
    for case in memory[-1]:
        ratios = []
        for run in memory:
            peaks = run.get(case) or {}
            peers = [v for name, v in peaks.items() if name not in ("ours", "ours compiled") and v]
            if peaks.get("ours") and peers:
                ratios.append(peaks["ours"] / min(peers))
        if len(ratios) == len(memory):
            lines.append(f"| {case} | **{statistics.median(ratios):.2f}** ({' / '.join(f'{v:.2f}' for v in ratios)}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[10_000, 1_000_000, 10_000_000],
                        help="prediction elements per call (e.g. 1e4 1e6 1e7)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per measurement (median)")
    parser.add_argument("--cases", nargs="*", default=None, help="case names to run (default: all)")
    parser.add_argument("--no-compiled", dest="compiled", action="store_false", help="skip ours under torch.compile")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory table")
    parser.add_argument("--json", metavar="FILE", help="also write every number as JSON")
    parser.add_argument("--ops", action="store_true",
                        help="instead of the timed rounds: each implementation's top-level aten ops (and backward "
                             "nodes) of one call, and its µs per call, on one thread")
    parser.add_argument("--median", nargs="+", metavar="RUN", help="print the median over runs' --json files, run nothing")
    parser.add_argument("--memory-child", nargs=3, metavar=("CASE", "IMPLEMENTATION", "ELEMENTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv))
    if args.median:
        print(median_of_runs([json.loads(Path(path).read_text()) for path in args.median]))
        return 0
    if args.memory_child:
        case_name, implementation, elements = args.memory_child
        print(memory_child(case_name, implementation, int(elements)))
        return 0
    results = op_profiles(args) if args.ops else run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
