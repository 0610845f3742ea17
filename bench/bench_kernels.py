r"""In-process micro-benchmark of the loss kernels against plain ``torch.nn.functional``.

Usage (from the repository root, venv active)::

    python bench/bench_kernels.py                 # torch's default thread count
    python bench/bench_kernels.py --threads 1     # one torch thread (what a 2-core server should use)
    python bench/bench_kernels.py --sizes 100000 --repeats 5
    python bench/bench_kernels.py --threads 1 --sizes 1000 --repeats 41   # per-call overhead, in µs

For every workload and size it times, in one run and interleaved round by round (so that machine
noise hits all of them alike), the median wall time of

* ``module(p, t, w)`` -- the registered loss built with ``losses.build(..., reduction="mean")``,
* ``module.statistics(p, t, w, False)`` -- the kernel the gRPC server calls,
* ``module.reductions(module.statistics(p, t, w, False)[1])`` -- ``stats+red``, all the loss work
  of one server request,
* the plain PyTorch equivalent (``F.binary_cross_entropy_with_logits(p, t, weight=w,
  pos_weight=...)``, ``F.cross_entropy``, ...), the floor an engineer would otherwise use,

and prints the times and the ratios ``module / torch`` and ``statistics / torch``: in milliseconds,
or in microseconds when every size is below 1e5 elements. A call on fewer than 1e5 elements costs
about as much as timing it, so each timed sample there is the mean of several consecutive calls
(``1e5 / elements`` of them). Like the server, the process tunes glibc's malloc first
(``loss_service.server.tune_malloc``) so that large temporaries reuse warm pages;
``--no-tune-malloc`` measures with glibc's defaults.

``--forms`` times instead each place where a kernel keeps an eager form beside its export form
(``if is_tracing(): <export form> else: <eager form>``): the registered loss that reaches it,
with the eager form and with the export form forced (``is_tracing`` patched to ``True`` in the
kernel's module, which also skips the eager form's value checks, in the export form's favour, and
``_reduction.eager_python`` to ``False``: the hyperparameters are 0-d tensors, as while exporting),
forward without grad and forward+backward, and prints ``export / eager``. A kernel keeps an eager
form only where this ratio is at least 1.5 in the mode the form serves (docs/benchmarks.md).

``--sums`` times the kernels that, asked for their totals alone (``statistics(..., values=False)``, what
``forward`` asks for a scalar reduction), sum the loss with torch's fused kernel instead of writing their
values: ``reductions(statistics(p, t, None, False, values)[1])`` with ``values=True`` and ``False``, on the
peer benchmark's inputs, forward without grad and forward+backward, and prints ``values / sums``.
Their peak memory is the peer benchmark's table (docs/benchmarks.md, "values=False").

``--against DIR`` times every registered loss's module (``forward``, no grad) on its own inputs
(``make_inputs``, the first two ``test_params`` settings, ``(8, 3, S)`` for two sizes ``S``) side by
side with the same loss of another checkout's ``loss_service/losses`` in ``DIR``, loaded into the
same process, and prints ``this / other`` per setting and per loss: how a change moved each loss.

Inputs have the layout of the service benchmark (``bench/bench_score.py``): predictions
``(E/4, 4)`` float32 (classes along dim 1, the last one), so *E* is the number of prediction
elements; weights are per element of the loss (``(E/4, 4)`` for the binary losses, ``(E/4,)``
for the class-index losses).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    # Run as a script (python bench/bench_kernels.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_peers  # noqa: E402
from loss_service import losses  # noqa: E402
from loss_service.losses import _reduction, _stable  # noqa: E402
from loss_service.server import tune_malloc  # noqa: E402

# The peer benchmark's layout and settings (classes, focal gamma, the size below which one sample is
# the mean of several calls).
NUM_CLASSES, GAMMA, BATCHED_BELOW = bench_peers.CLASSES, bench_peers.GAMMA, bench_peers.BATCHED_BELOW
IGNORE_INDEX = -100


@dataclass
class Workload:
    r"""One row of the table: a built loss, its inputs and the plain-torch call it is compared with."""

    name: str
    module: torch.nn.Module
    predictions: torch.Tensor
    targets: torch.Tensor
    weights: Optional[torch.Tensor]
    plain: Callable[[], torch.Tensor]


def _torch_focal(predictions, targets, weights, class_weight, ignore_index, gamma):
    r"""The usual plain-torch softmax focal loss: ``(1 - p_t)^γ · CE`` from ``F.cross_entropy``."""
    cross_entropy = F.cross_entropy(predictions, targets, ignore_index=ignore_index, reduction="none")
    loss = (1.0 - torch.exp(-cross_entropy)) ** gamma * cross_entropy
    if class_weight is not None:
        loss = loss * class_weight[targets.clamp(min=0)]
    if weights is not None:
        loss = loss * weights
    return loss.mean()


def workloads(elements: int, generator: torch.Generator) -> List[Workload]:
    rows = elements // NUM_CLASSES
    shape = (rows, NUM_CLASSES)
    logits = torch.randn(shape, generator=generator) * 3
    binary_targets = (torch.rand(shape, generator=generator) < 0.3).float()
    element_weights = torch.rand(shape, generator=generator)
    probabilities = torch.sigmoid(logits)
    indices = torch.randint(0, NUM_CLASSES, (rows,), generator=generator)
    ignored = torch.rand(rows, generator=generator) < 0.15
    indices_with_ignored = torch.where(ignored, torch.full_like(indices, IGNORE_INDEX), indices)
    row_weights = torch.rand(rows, generator=generator)
    pos_weight = torch.tensor([3.0, 0.5, 1.0, 2.0])
    class_weight = torch.tensor([0.5, 2.0, 1.0, 1.5])

    return [
        Workload(
            "bce_with_logits+w",
            losses.build("bce_with_logits"),
            logits, binary_targets, element_weights,
            lambda: F.binary_cross_entropy_with_logits(logits, binary_targets, weight=element_weights),
        ),
        Workload(
            "bce_with_logits+w+pos_weight",
            losses.build("bce_with_logits", pos_weight=pos_weight),
            logits, binary_targets, element_weights,
            # pos_weight broadcasts along the last dim in torch: the class dim of (E/4, 4).
            lambda: F.binary_cross_entropy_with_logits(logits, binary_targets, weight=element_weights,
                                                       pos_weight=pos_weight),
        ),
        Workload(
            "bce+w",
            losses.build("bce"),
            probabilities, binary_targets, element_weights,
            lambda: F.binary_cross_entropy(probabilities, binary_targets, weight=element_weights),
        ),
        Workload(
            "focal",
            losses.build("focal", gamma=GAMMA),
            logits, indices, None,
            lambda: _torch_focal(logits, indices, None, None, IGNORE_INDEX, GAMMA),
        ),
        Workload(
            "focal+w",
            losses.build("focal", gamma=GAMMA),
            logits, indices, row_weights,
            lambda: _torch_focal(logits, indices, row_weights, None, IGNORE_INDEX, GAMMA),
        ),
        Workload(
            "focal+w+class_weight+ignore",
            losses.build("focal", gamma=GAMMA, class_weight=class_weight, ignore_index=IGNORE_INDEX),
            logits, indices_with_ignored, row_weights,
            lambda: _torch_focal(logits, indices_with_ignored, row_weights, class_weight, IGNORE_INDEX, GAMMA),
        ),
        Workload(
            "cross_entropy+w",
            losses.build("cross_entropy"),
            logits, indices, row_weights,
            lambda: (F.cross_entropy(logits, indices, reduction="none") * row_weights).mean(),
        ),
        Workload(
            "cross_entropy+class_weight+ignore",
            losses.build("cross_entropy", class_weight=class_weight, ignore_index=IGNORE_INDEX),
            logits, indices_with_ignored, row_weights,
            lambda: (F.cross_entropy(logits, indices_with_ignored, weight=class_weight,
                                     ignore_index=IGNORE_INDEX, reduction="none") * row_weights).mean(),
        ),
    ]


def _time_once(call: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) * 1e3 / calls


def measure(workload: Workload, repeats: int) -> Dict[str, float]:
    r"""Median ms per call of the module, its statistics, statistics+reductions and plain torch,
    interleaved after one warm-up each."""
    m, p, t, w = workload.module, workload.predictions, workload.targets, workload.weights
    calls = {
        "module": lambda: m(p, t, w),
        "statistics": lambda: m.statistics(p, t, w, False),
        "stats+red": lambda: m.reductions(m.statistics(p, t, w, False)[1]),
        "torch": workload.plain,
    }
    per_sample = max(1, BATCHED_BELOW // p.numel())
    times: Dict[str, List[float]] = {key: [] for key in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for key, call in calls.items():
                times[key].append(_time_once(call, per_sample))
    return {key: statistics.median(values) for key, values in times.items()}


@dataclass
class FormSite:
    r"""One eager form: the kernel modules whose ``is_tracing`` selects it, the loss that reaches it
    (or, for a building block, the ``loss_service.losses._stable`` function itself on the logits),
    and whether it serves inference (no grad) or training (forward + backward)."""

    name: str
    modules: Sequence[str]
    loss: str
    params: Dict[str, object]
    index_targets: bool
    training: bool
    function: str = ""
    # Images (N, 4, 64, 64) rather than rows (E/4, 4): the region losses' spatial sums.
    images: bool = False


FORM_SITES = [
    FormSite("cross_entropy class indices", ["cross_entropy"], "cross_entropy", {}, True, False),
    FormSite("cross_entropy class indices", ["cross_entropy"], "cross_entropy", {}, True, True),
    FormSite("focal class indices", ["focal", "cross_entropy"], "focal", {"gamma": GAMMA}, True, False),
    FormSite("focal class indices", ["focal", "cross_entropy"], "focal", {"gamma": GAMMA}, True, True),
    FormSite("bce values", ["bce"], "bce", {}, False, False),
    FormSite("bce closed-form backward", ["bce"], "bce", {}, False, True),
    FormSite("bce_with_logits fused", ["bce"], "bce_with_logits", {}, False, False),
    FormSite("bce_with_logits fused", ["bce"], "bce_with_logits", {}, False, True),
    FormSite("binary_focal closed-form backward", ["focal"], "binary_focal", {"gamma": GAMMA}, False, False),
    FormSite("binary_focal closed-form backward", ["focal"], "binary_focal", {"gamma": GAMMA}, False, True),
    FormSite("region class-index sums", ["region"], "dice", {"mode": "multiclass"}, True, False, images=True),
    FormSite("region class-index sums", ["region"], "dice", {"mode": "multiclass"}, True, True, images=True),
    FormSite("region dense, nothing ignored", ["region"], "dice", {}, False, False, images=True),
    FormSite("region dense, nothing ignored", ["region"], "dice", {}, False, True, images=True),
    FormSite("statistics sums", ["_reduction"], "mse", {}, False, False),
    FormSite("huber fused", ["regression"], "huber", {}, False, False),
    FormSite("huber fused", ["regression"], "huber", {}, False, True),
    FormSite("logsumexp", ["_stable"], "", {}, False, False, "logsumexp"),
    FormSite("log_softmax", ["_stable"], "", {}, False, False, "log_softmax"),
    FormSite("log_softmax", ["_stable"], "", {}, False, True, "log_softmax"),
    FormSite("power (float exponent)", ["_reduction"], "", {}, False, False, "power"),
    FormSite("power (float exponent)", ["_reduction"], "", {}, False, True, "power"),
]
# The building blocks timed on their own: (their module, the call on the logits).
BUILDING_BLOCKS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "logsumexp": lambda x: _stable.logsumexp(x, 1),
    "log_softmax": lambda x: _stable.log_softmax(x, 1),
    "power": lambda x: _reduction.power(x.abs(), torch.tensor(GAMMA)),
}


def _form_call(site: FormSite, elements: int, generator: torch.Generator) -> Callable[[], object]:
    rows = elements // NUM_CLASSES
    logits = torch.randn((rows, NUM_CLASSES), generator=generator) * 3
    if site.images:
        # The peer benchmark's images: class indices (N, 4, S, S) or binary masks (4N, 1, S, S).
        make_images = bench_peers.class_images if site.index_targets else bench_peers.binary_images
        return _step(losses.build(site.loss, **site.params), *make_images(elements, generator), site.training)
    if site.function:
        block = BUILDING_BLOCKS[site.function]
        module: Callable[..., torch.Tensor] = lambda p, t: block(p).sum()
    else:
        module = losses.build(site.loss, **site.params)
    if site.index_targets:
        targets = torch.randint(0, NUM_CLASSES, (rows,), generator=generator)
    else:
        targets = (torch.rand((rows, NUM_CLASSES), generator=generator) < 0.3).float()
    if site.loss == "bce":
        logits = torch.sigmoid(logits)
    return _step(module, logits, targets, site.training)


def _step(module: Callable[..., torch.Tensor], logits: torch.Tensor, targets: torch.Tensor,
          training: bool) -> Callable[[], object]:
    if not training:
        return lambda: module(logits, targets)
    leaf = logits.clone().requires_grad_(True)

    def step() -> None:
        module(leaf, targets).backward()
        leaf.grad = None

    return step


# The kernels with a fused sum for values=False, on the peer benchmark's inputs for them.
SUMS_SITES = [
    ("mse", bench_peers.real_rows), ("bce_with_logits", bench_peers.binary_rows),
    ("nll", bench_peers.log_probability_images), ("cross_entropy", bench_peers.class_images),
]


def _mean_from_totals(module: torch.nn.Module, values: bool) -> Callable[..., torch.Tensor]:
    def mean(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return module.reductions(module.statistics(predictions, targets, None, False, values)[1])[1]

    return mean


def measure_sums(sizes: Sequence[int], repeats: int) -> None:
    r"""Print ``values / sums`` per kernel of :data:`SUMS_SITES`, size and mode, both timed alternately."""
    print(f"| {'loss':>16} | {'mode':>9} | {'elements':>8} | {'values µs':>10} | {'sums µs':>10} | {'values/sums':>11} |")
    print("|" + "|".join(["---:"] * 6) + "|")
    generator = torch.Generator().manual_seed(0)
    for loss, make_inputs in SUMS_SITES:
        module = losses.build(loss)
        for elements in sizes:
            inputs = make_inputs(elements, generator)
            per_sample = max(1, BATCHED_BELOW // elements)
            for training in (False, True):
                calls = {values: _step(_mean_from_totals(module, values), *inputs, training) for values in (True, False)}
                times: Dict[bool, List[float]] = {True: [], False: []}
                with torch.set_grad_enabled(training):
                    for _ in range(repeats + 1):
                        for values, call in calls.items():
                            times[values].append(_time_once(call, per_sample))
                with_values, sums = (statistics.median(times[values][1:]) * 1e3 for values in (True, False))
                mode = "fwd+bwd" if training else "inference"
                print(f"| {loss:>16} | {mode:>9} | {elements:>8.0e} | {with_values:>10.1f} | {sums:>10.1f} | "
                      f"{with_values / sums:>11.2f} |", flush=True)


def measure_forms(sizes: Sequence[int], repeats: int) -> None:
    r"""Print ``export / eager`` per form site and size, the two forms timed alternately in one run."""
    from loss_service.losses import bce, cross_entropy, focal, region, regression

    kernels = {"_reduction": _reduction, "_stable": _stable, "bce": bce, "cross_entropy": cross_entropy, "focal": focal,
               "region": region, "regression": regression}
    print(f"| {'eager form':>28} | {'mode':>9} | {'elements':>8} | {'eager µs':>10} | {'export µs':>10} | "
          f"{'export/eager':>12} |")
    print("|" + "|".join(["---:"] * 6) + "|")
    generator = torch.Generator().manual_seed(0)
    for site in FORM_SITES:
        for elements in sizes:
            call = _form_call(site, elements, generator)
            per_sample = max(1, BATCHED_BELOW // elements)
            times: Dict[bool, List[float]] = {False: [], True: []}
            with torch.set_grad_enabled(site.training):
                for _ in range(repeats + 1):
                    for forced in (False, True):
                        # The export form: the site's kernels trace, and their hyperparameters are 0-d tensors.
                        patches = [(kernels[name], "is_tracing", True) for name in site.modules]
                        patches.append((_reduction, "eager_python", False))
                        originals = [
                            (module, attribute, getattr(module, attribute)) for module, attribute, _ in patches
                        ]
                        if forced:
                            for module, attribute, value in patches:
                                setattr(module, attribute, lambda value=value: value)
                        try:
                            times[forced].append(_time_once(call, per_sample))
                        finally:
                            for module, attribute, original in originals:
                                setattr(module, attribute, original)
            eager, export = (statistics.median(times[forced][1:]) * 1e3 for forced in (False, True))
            mode = "fwd+bwd" if site.training else "inference"
            print(f"| {site.name:>28} | {mode:>9} | {elements:>8.0e} | {eager:>10.1f} | {export:>10.1f} | "
                  f"{export / eager:>12.2f} |", flush=True)


def load_losses(checkout: str) -> object:
    r"""``<checkout>/loss_service/losses`` imported as a package of its own (it imports only relatively)."""
    import importlib.util

    folder = Path(checkout).resolve() / "loss_service" / "losses"
    name = f"losses_of_{abs(hash(str(folder)))}"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against: no loss package in {folder}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def measure_against(checkout: str, repeats: int) -> None:
    r"""Print ``this / other`` for every loss's module, timed alternately in one process (the losses both
    checkouts have, with the settings the other's parameters allow)."""
    other = load_losses(checkout)
    print(f"| {'loss':>15} | {'setting':>7} | {'elements':>8} | {'this µs':>9} | {'other µs':>9} | {'this/other':>10} |")
    print("|" + "|".join(["---:"] * 6) + "|")
    ratios: Dict[str, List[float]] = {}
    for spec in [spec for spec in losses.specs() if spec.name in other.names()]:
        other_params = set(other.get(spec.name).param_names())
        for index, params in enumerate(spec.test_params[:2]):
            if not set(params) <= other_params:
                continue
            for size in (16, 4096):
                predictions, targets = spec.make_inputs(8, 3, (size,), torch.Generator().manual_seed(index),
                                                        torch.float32, params)
                modules = [losses.build(spec.name, **params), other.build(spec.name, **params)]
                calls = max(1, 100_000 // predictions.numel())
                times: List[List[float]] = [[], []]
                with torch.no_grad():
                    for module in modules:
                        module(predictions, targets)
                    for round_index in range(repeats):
                        # Alternate which goes first: the second of two calls runs on warmer caches.
                        for slot in (0, 1) if round_index % 2 else (1, 0):
                            module = modules[slot]
                            times[slot].append(_time_once(lambda: module(predictions, targets), calls))
                this, that = (statistics.median(values) * 1e3 for values in times)
                ratios.setdefault(spec.name, []).append(this / that)
                print(f"| {spec.name:>15} | {index:>7} | {predictions.numel():>8.0e} | {this:>9.1f} | {that:>9.1f} | "
                      f"{this / that:>10.2f} |", flush=True)
    print("\n| loss | median this/other | worst this/other |\n|---|---:|---:|")
    for name, values in ratios.items():
        print(f"| {name} | {statistics.median(values):.2f} | {max(values):.2f} |")


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="prediction elements per call (multiples of 4; default 100000 1000000)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement (median)")
    parser.add_argument("--only", nargs="*", default=None, help="workload names to run (default: all)")
    parser.add_argument("--forms", action="store_true", help="time each kernel's eager form against its export form")
    parser.add_argument("--sums", action="store_true", help="time the fused sums of values=False against the values")
    parser.add_argument("--against", metavar="DIR", help="time every loss side by side with another checkout's")
    parser.add_argument("--no-tune-malloc", action="store_true",
                        help="keep glibc's default malloc thresholds (the server tunes them at start)")
    args = parser.parse_args(list(argv))
    known = [workload.name for workload in workloads(NUM_CLASSES, torch.Generator().manual_seed(0))]
    unknown = [name for name in args.only or [] if name not in known]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; valid: {', '.join(known)}")
    if args.against and args.sizes:
        parser.error("--against times two fixed sizes (384 and 98,304 elements): --sizes does not apply to it")
    args.sizes = args.sizes or [100_000, 1_000_000]
    if any(size <= 0 or size % NUM_CLASSES for size in args.sizes):
        parser.error(f"--sizes must be positive multiples of {NUM_CLASSES}, got {args.sizes}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # As the server does: large temporaries reuse warm heap pages instead of faulting in fresh ones.
    tuned = False if args.no_tune_malloc else tune_malloc()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), malloc tuned: {tuned}, median of "
          f"{args.repeats}, predictions (E/4, {NUM_CLASSES}) float32, reduction=mean, no grad")
    if args.forms:
        measure_forms(args.sizes, args.repeats)
        return 0
    if args.sums:
        measure_sums(args.sizes, args.repeats)
        return 0
    if args.against:
        measure_against(args.against, args.repeats)
        return 0
    unit, scale = ("µs", 1e3) if max(args.sizes) < BATCHED_BELOW else ("ms", 1.0)
    columns = [f"module {unit}", f"statistics {unit}", f"stats+red {unit}", f"torch {unit}"]
    header = f"| {'workload':>34} | {'elements':>8} | " + " | ".join(f"{name:>13}" for name in columns) + \
             f" | {'module/torch':>12} | {'statistics/torch':>16} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) - 1) + ":" for cell in header.split("|")[1:-1]) + "|")
    generator = torch.Generator().manual_seed(0)
    for elements in args.sizes:
        for workload in workloads(elements, generator):
            if args.only and workload.name not in args.only:
                continue
            result = measure(workload, args.repeats)
            times = " | ".join(f"{result[key] * scale:>13.2f}" for key in ("module", "statistics", "stats+red", "torch"))
            print(f"| {workload.name:>34} | {elements:>8.0e} | {times} | {result['module'] / result['torch']:>12.2f} "
                  f"| {result['statistics'] / result['torch']:>16.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
