r"""The loss suite, generated from the registry: a new loss gets every test here for free.

For every registered loss, every setting in its ``test_params`` and every reduction: parity with an
independent reference (float64 tight, float32), gradcheck, module == function, scripted == eager
(values and gradients, after a save/reload), additive statistics, and the edge cases (empty batch,
all targets ignored, logits of ±1e4, float16/bfloat16, non-contiguous inputs, bad parameters).
"""
import functools
import io
import math

import numpy as np
import pytest
import torch

from loss_service import layout, losses
from loss_service.losses import REDUCTIONS

from .references import REFERENCES

NUM_CLASSES = 3
SPATIAL = (4, 5)
# Tolerance table per dtype: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 2e-2),
}

CASES = [
    pytest.param(spec.name, index, id=f"{spec.name}-{index}")
    for spec in losses.specs()
    for index in range(len(spec.test_params))
]
LOSS_NAMES = losses.names()


def make(name, index=0, dtype=torch.float64, batch=3, spatial=SPATIAL, seed=0, num_classes=NUM_CLASSES):
    spec = losses.get(name)
    params = dict(spec.test_params[index])
    generator = torch.Generator().manual_seed(seed)
    predictions, targets = spec.make_inputs(batch, num_classes, spatial, generator, dtype, params)
    return spec, params, predictions, targets


def cast_params(params, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in params.items()}


def element_weight_shape(spec, module, predictions, targets):
    if spec.pixel_weights:
        return predictions.shape
    values, _, _ = module.statistics(predictions, targets, None, False)
    return values.shape


def weight_cases(spec, module, predictions, targets, seed=1):
    generator = torch.Generator().manual_seed(seed)
    batch = predictions.shape[0]
    shape = element_weight_shape(spec, module, predictions, targets)
    return {
        "none": None,
        "per_sample": torch.rand(batch, generator=generator, dtype=predictions.dtype) + 0.1,
        "elementwise": torch.rand(shape, generator=generator, dtype=predictions.dtype),
    }


def assert_close(actual, expected, dtype, what=""):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol, msg=what)


def test_every_loss_has_a_reference_and_documentation():
    missing = [name for name in LOSS_NAMES if name not in REFERENCES]
    assert not missing, f"losses without an independent reference in tests/references: {missing}"
    for spec in losses.specs():
        assert spec.summary and spec.reference, spec.name
        for param in spec.params:
            assert param.doc, f"{spec.name}.{param.name} has no doc"


def test_a_declared_logits_alternative_takes_logits_for_the_same_targets():
    declared = [spec for spec in losses.specs() if spec.logits_alternative]
    assert [spec.name for spec in declared] == ["bce"]
    for spec in declared:
        alternative = losses.get(spec.logits_alternative)
        assert (alternative.predictions, alternative.targets) == ("logits", spec.targets), spec.name


VARIANT_CASES = [
    pytest.param(spec.name, variant, id=f"{spec.name}-{layout.variant_key(variant) or 'default'}")
    for spec in losses.specs()
    for variant in layout.variants(spec)
]


@pytest.mark.parametrize("name,variant", VARIANT_CASES)
def test_declared_forms_are_what_the_module_does(name, variant):
    r"""Each setting's :class:`~loss_service.losses.Forms`, which the layout, the exporter and the
    server read instead of running the loss, against what the module takes and returns."""
    spec = losses.get(name)
    forms = layout.forms(spec, variant)
    module = losses.build(name, **layout.variant_params(spec, variant))
    batch, classes, size = 2, 3, 5
    predictions, targets = spec.make_inputs(
        batch, classes, (size,), torch.Generator().manual_seed(0), torch.float64, layout.variant_params(spec, variant)
    )
    assert (targets.dim() == predictions.dim() - 1) == forms.index_targets
    assert (predictions.shape[1] == 1) == forms.single_channel
    values, totals, _ = module.statistics(predictions, targets, None, False)
    channels = predictions.shape[1]
    expected = {"NCS": (batch, channels, size), "NS": (batch, size), "NC": (batch, channels), "C": (channels,),
                "N": (batch,), "1": (1,)}[forms.values]
    assert tuple(values.shape) == expected
    names = forms.totals_layout(channels)
    assert totals.shape == (len(names),)
    assert forms.classes_of_layout(names) == (channels if any(b.endswith("overlap") for b in forms.totals) else 0)
    if forms.elementwise_totals:
        assert int(totals[3]) >= values.numel()
    # forward reduces one elementwise block by the elementwise rule alone, anything else by the loss's reductions.
    assert module.elementwise_totals() == (forms.totals == ("elementwise",))
    probabilities = torch.softmax(torch.randn(predictions.shape, dtype=torch.float64), dim=1)
    if "probabilities" in forms.targets:
        module.statistics(predictions, probabilities, None, False)
    elif forms.index_targets:
        with pytest.raises(ValueError):
            module.statistics(predictions, probabilities, None, False)
    if forms.index_targets and forms.indices_with_channel:
        torch.testing.assert_close(module.statistics(predictions, targets.unsqueeze(1), None, False)[1], totals)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,index", CASES)
def test_matches_reference(name, index, dtype, reduction):
    spec, params, predictions, targets = make(name, index, torch.float64)
    module = losses.build(name, **params, reduction=reduction)
    for label, weights in weight_cases(spec, module, predictions, targets).items():
        expected = REFERENCES[name](predictions, targets, weights, params, reduction)
        cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        typed = losses.build(name, **cast_params(params, dtype), reduction=reduction)
        actual = typed(cast(predictions), cast(targets), cast(weights))
        assert actual.dtype == dtype
        assert_close(actual, expected, dtype, f"{name} {params} weights={label}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,index", CASES)
def test_gradcheck(name, index, reduction):
    spec, params, predictions, targets = make(name, index, torch.float64, batch=2, spatial=(2,))
    module = losses.build(name, **params, reduction=reduction)
    weights = weight_cases(spec, module, predictions, targets)["per_sample"]
    predictions = predictions.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: module(p, targets, weights), (predictions,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,index", CASES)
def test_module_equals_function(name, index, reduction):
    spec, params, predictions, targets = make(name, index)
    module = losses.build(name, **params, reduction=reduction)
    weights = weight_cases(spec, module, predictions, targets)["per_sample"]
    expected = spec.function(predictions, targets, weights, reduction=reduction, **params)
    torch.testing.assert_close(module(predictions, targets, weights), expected, rtol=0, atol=0)


def _number_forms(value, kind):
    r"""A scalar setting as a caller may write it: int, float (for a float setting) and numpy scalars."""
    if kind == "int":
        return [int(value), np.int64(value), np.int32(value)]
    forms = [float(value), np.float64(value), np.float32(value)]
    return forms + [int(value), np.int64(value)] if float(value).is_integer() else forms


def _vector_forms(vector):
    r"""A per-class setting as a caller may write it: list, tuple, numpy arrays, tensors of each dtype."""
    values = vector.tolist()
    forms = [values, tuple(values), np.asarray(values), np.asarray(values, np.float32), vector.float(), vector.double()]
    if all(float(v).is_integer() for v in values):
        forms += [[int(v) for v in values], vector.long()]
    return forms


def _setting_forms():
    r"""(loss, test_params index, parameter, value form) for every numeric and vector parameter of
    every loss: scalars from their default (or a test setting), vectors from a test setting."""
    for spec in losses.specs():
        for param in spec.params:
            if param.kind not in ("float", "int", "vector", "float_or_vector"):
                continue
            index = next((i for i, setting in enumerate(spec.test_params) if param.name in setting), 0)
            values = [spec.test_params[index].get(param.name, param.default)]
            if param.kind == "float_or_vector":
                values += [setting[param.name] for setting in spec.test_params if param.name in setting]
            for value in values:
                if value is None:
                    continue
                tensor = isinstance(value, torch.Tensor) and value.dim() > 0
                for form in (_vector_forms(value) if tensor else _number_forms(value, param.kind)):
                    yield pytest.param(spec.name, index, param.name, form,
                                       id=f"{spec.name}-{param.name}-{type(form).__name__}-{getattr(form, 'dtype', '')}")


@pytest.mark.parametrize("name, index, param_name, form", list(_setting_forms()))
def test_function_and_module_take_every_form_of_a_setting_the_registry_accepts(name, index, param_name, form):
    r"""The function, the module and the canonical value agree; a form the registry refuses is refused
    by both (``focal_loss(alpha=1)`` once ignored ``alpha``: only float and Tensor were handled)."""
    spec, params, predictions, targets = make(name, index)
    param = spec.param(param_name)
    others = {k: v for k, v in params.items() if k != param_name}
    try:
        canonical = param.validate(form, name)
    except ValueError:
        with pytest.raises(ValueError, match=param_name):
            losses.build(name, **others, **{param_name: form})
        return
    expected = losses.build(name, **others, **{param_name: canonical})(predictions, targets)
    torch.testing.assert_close(losses.build(name, **others, **{param_name: form})(predictions, targets), expected,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(spec.function(predictions, targets, **others, **{param_name: form}), expected,
                               rtol=1e-12, atol=0)


@functools.lru_cache(maxsize=None)
def _scripted_and_reloaded(name, index):
    r"""One scripted, saved and reloaded module per setting; tests pick the reduction by setattr,
    which is how a C++ trainer changes it (and scripting takes most of this suite's time)."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(losses.build(name, **losses.get(name).test_params[index])), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,index", CASES)
def test_scripted_equals_eager(name, index, reduction):
    spec, params, predictions, targets = make(name, index)
    module = losses.build(name, **params, reduction=reduction)
    scripted = _scripted_and_reloaded(name, index)
    scripted.reduction = reduction
    for label, weights in weight_cases(spec, module, predictions, targets).items():
        eager_input = predictions.detach().clone().requires_grad_(True)
        script_input = predictions.detach().clone().requires_grad_(True)
        eager = module(eager_input, targets, weights)
        script = scripted(script_input, targets, weights)
        torch.testing.assert_close(script, eager, rtol=1e-12, atol=1e-12, msg=label)
        eager.sum().backward()
        script.sum().backward()
        torch.testing.assert_close(script_input.grad, eager_input.grad, rtol=1e-12, atol=1e-12, msg=label)


@pytest.mark.parametrize("name,index", CASES)
def test_statistics_are_additive_over_samples(name, index):
    spec, params, predictions, targets = make(name, index, batch=5)
    module = losses.build(name, **params)
    weights = weight_cases(spec, module, predictions, targets)["per_sample"]
    _, totals, sample_totals = module.statistics(predictions, targets, weights, True)
    assert totals.dtype == torch.float64
    assert sample_totals.shape[0] == predictions.shape[0]
    torch.testing.assert_close(sample_totals.sum(0), totals, rtol=1e-12, atol=1e-12)
    _, first, _ = module.statistics(predictions[:2], targets[:2], weights[:2], False)
    _, rest, _ = module.statistics(predictions[2:], targets[2:], weights[2:], False)
    torch.testing.assert_close(first + rest, totals, rtol=1e-12, atol=1e-12)
    for reduction in ("sum", "mean", "weighted_mean"):
        column = ["sum", "mean", "weighted_mean"].index(reduction)
        whole = losses.build(name, **params, reduction=reduction)(predictions, targets, weights)
        torch.testing.assert_close(module.reductions(totals)[column], whole, rtol=1e-12, atol=1e-12)
        alone = losses.build(name, **params, reduction=reduction)(predictions[1:2], targets[1:2], weights[1:2])
        torch.testing.assert_close(module.reductions(sample_totals)[1, column], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean"])
@pytest.mark.parametrize("name,index", CASES)
def test_totals_alone_equal_the_totals_of_the_values(name, index, reduction):
    r"""``statistics(..., values=False)`` -- what ``forward`` asks for a scalar reduction -- may sum the loss
    with torch's fused kernel instead of writing the values: the same totals, loss and gradient."""
    spec, params, predictions, targets = make(name, index)
    module = losses.build(name, **params, reduction=reduction)
    column = ["sum", "mean", "weighted_mean"].index(reduction)
    for label, weights in weight_cases(spec, module, predictions, targets).items():
        results = []
        for values in (True, False):
            leaf = predictions.detach().clone().requires_grad_(True)
            _, totals, _ = module.statistics(leaf, targets, weights, False, values)
            loss = module.reductions(totals)[column]
            (gradient,) = torch.autograd.grad(loss, leaf)
            results.append((totals.detach(), loss.detach(), gradient))
        for what, with_values, alone in zip(("totals", "loss", "gradient"), *results):
            torch.testing.assert_close(alone, with_values, rtol=1e-12, atol=1e-12, msg=f"{label}: {what}")
        torch.testing.assert_close(module(predictions, targets, weights), results[0][1], rtol=1e-12, atol=1e-12)


# The losses whose forward takes torch's own reduction for their default settings (docs/architecture.md,
# "Modules"): that of torch's fused loss, or (binary_focal) torch's sum of the values.
FUSED_BY_DEFAULT = {"mse", "l1", "huber", "smooth_l1", "bce_with_logits", "binary_focal", "cross_entropy", "nll"}


def _without_ignored(spec, params, targets):
    r"""``targets`` with every ``ignore_index`` target replaced by class 0, for class-index targets."""
    ignore_index = params.get("ignore_index", -100 if "ignore_index" in spec.param_names() else None)
    if ignore_index is None or targets.is_floating_point():
        return targets
    return torch.where(targets == ignore_index, torch.zeros_like(targets), targets)


@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean"])
@pytest.mark.parametrize("name,index", CASES)
def test_fused_reduction_is_the_statistics_reduction(name, index, reduction):
    r"""Where ``forward`` takes torch's own reduction (``fused_reduction``), its value and gradient are the
    statistics' reduction, and the function form returns the same; with and without ignored targets."""
    spec, params, predictions, index_targets = make(name, index)
    column = ["sum", "mean", "weighted_mean"].index(reduction)
    for targets in (index_targets, _without_ignored(spec, params, index_targets)):
        for dtype in (torch.float64, torch.float32):
            typed = losses.build(name, **cast_params(params, dtype), reduction=reduction)
            leaf = predictions.detach().to(dtype).requires_grad_(True)
            fused = typed.fused_reduction(leaf, targets, None)
            if fused is None:
                continue
            assert fused.dtype == dtype
            (fused_gradient,) = torch.autograd.grad(fused, leaf)
            other = predictions.detach().to(dtype).requires_grad_(True)
            _, totals, _ = typed.statistics(other, targets, None, False)
            expected = typed.reductions(totals)[column]
            (expected_gradient,) = torch.autograd.grad(expected, other)
            rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else TOLERANCES[dtype]
            torch.testing.assert_close(fused.double(), expected, rtol=rtol, atol=atol)
            torch.testing.assert_close(fused_gradient, expected_gradient, rtol=rtol, atol=atol)
            with torch.no_grad():
                function = spec.function(leaf, targets, reduction=reduction, **cast_params(params, dtype))
                torch.testing.assert_close(function, typed(leaf, targets), rtol=0, atol=0)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_forward_takes_torchs_own_reduction_where_it_is_ours(name):
    r"""The default settings of :data:`FUSED_BY_DEFAULT` take ``fused_reduction``, with and without autograd; not
    with call-time weights and ``weighted_mean`` (torch's reductions have no weight sum) nor for ``none``."""
    spec, params, predictions, targets = make(name, 0)
    targets = _without_ignored(spec, params, targets)
    module = losses.build(name, **params)
    leaf = predictions.detach().requires_grad_(True)
    with torch.no_grad():
        taken = module.fused_reduction(predictions, targets, None) is not None
    assert taken == (name in FUSED_BY_DEFAULT)
    assert (module.fused_reduction(leaf, targets, None) is not None) == taken
    weights = torch.rand(predictions.shape[0], dtype=predictions.dtype) + 0.5
    assert losses.build(name, **params, reduction="weighted_mean").fused_reduction(predictions, targets, weights) is None
    assert losses.build(name, **params, reduction="none").fused_reduction(predictions, targets, None) is None


@pytest.mark.parametrize(
    "rows,classes,differentiable,taken",
    [
        (1000, 4, False, True),  # few elements
        (2000, 4, False, False),  # 8000 elements: the statistics' forward is the faster
        (2000, 4, True, True),  # ... torch's forward and backward, with the backward
        (4000, 4, True, False),
        (4000, 16, False, True),  # a row fills a vector register
        (1000, 100, True, True),
        (5, 1, False, True),
    ],
)
def test_cross_entropy_on_rows_takes_torchs_kernel_where_it_is_faster(rows, classes, differentiable, taken):
    r"""Cross-entropy on rows ``(N, C)`` takes torch's fused kernel for many classes or few elements
    (``cross_entropy.fused_cross_entropy_suits_rows``), the statistics otherwise; the same loss and gradient."""
    generator = torch.Generator().manual_seed(rows + classes)
    predictions = torch.randn(rows, classes, generator=generator)
    targets = torch.randint(0, classes, (rows,), generator=generator)
    module = losses.build("cross_entropy", class_weight=torch.rand(classes, generator=generator) + 0.5)
    leaf = predictions.clone().requires_grad_(differentiable)
    fused = module.fused_reduction(leaf, targets, None)
    assert (fused is not None) == taken
    other = predictions.clone().requires_grad_(differentiable)
    expected = module.reductions(module.statistics(other, targets, None, False)[1])[1]
    torch.testing.assert_close(module(leaf, targets).double(), expected, rtol=1e-5, atol=1e-6)
    if differentiable:
        torch.testing.assert_close(
            torch.autograd.grad(module(leaf, targets), leaf)[0], torch.autograd.grad(expected, other)[0],
            rtol=1e-5, atol=1e-7,
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_batch_is_finite(name, reduction):
    spec, params, predictions, targets = make(name, batch=0)
    predictions = predictions.requires_grad_(True)
    result = losses.build(name, **params, reduction=reduction)(predictions, targets)
    assert torch.isfinite(result).all()
    if reduction != "none":
        assert float(result.detach()) == 0.0
    result.sum().backward()
    assert predictions.grad.shape == predictions.shape


@pytest.mark.parametrize("reduction", ["mean", "weighted_mean", "sum"])
@pytest.mark.parametrize("name", [s.name for s in losses.specs() if "ignore_index" in s.param_names()])
def test_all_targets_ignored_gives_zero(name, reduction):
    spec, params, predictions, targets = make(name)
    targets = torch.full_like(targets, -100)
    predictions = predictions.requires_grad_(True)
    result = losses.build(name, ignore_index=-100, reduction=reduction)(predictions, targets)
    assert float(result.detach()) == 0.0
    result.backward()
    assert torch.isfinite(predictions.grad).all()


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", [s.name for s in losses.specs() if "ignore_index" in s.param_names()])
def test_ignored_positions_do_not_poison_the_loss_or_its_gradient(name, reduction, garbage):
    r"""Padding often holds garbage: NaN or ±inf predictions at every class of ignored positions leave the
    loss as it is with zeros there, and the gradient finite and 0 at those positions; scripted too."""
    spec, params, predictions, targets = make(name)
    positions = torch.zeros((predictions.shape[0],) + tuple(predictions.shape[2:]), dtype=torch.bool)
    positions.view(-1)[::3] = True
    garbage_at = positions.unsqueeze(1).expand(predictions.shape)
    ignored = garbage_at if targets.shape == predictions.shape else positions.reshape(targets.shape)
    targets = torch.where(ignored, torch.full_like(targets, -100), targets)
    clean = torch.where(garbage_at, 0.0, predictions)
    dirty = torch.where(garbage_at, garbage, predictions)
    scripted = _scripted_and_reloaded(name, 0)
    scripted.ignore_index, scripted.reduction = -100, reduction
    for label, module in (("eager", losses.build(name, ignore_index=-100, reduction=reduction)), ("scripted", scripted)):
        leaf = dirty.clone().requires_grad_(True)
        result = module(leaf, targets)
        torch.testing.assert_close(result, module(clean, targets), rtol=1e-12, atol=1e-12, msg=label)
        (gradient,) = torch.autograd.grad(result.sum(), leaf)
        assert torch.isfinite(gradient).all(), label
        assert (gradient[garbage_at] == 0).all(), label


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,index", [c for c in CASES if losses.get(c.values[0]).predictions == "logits"])
def test_extreme_logits_are_finite(name, index, reduction):
    spec, params, predictions, targets = make(name, index, torch.float32)
    signs = torch.where(torch.randn(predictions.shape, generator=torch.Generator().manual_seed(3)) > 0, 1.0, -1.0)
    extreme = (signs * 1e4).requires_grad_(True)
    result = losses.build(name, **cast_params(params, torch.float32), reduction=reduction)(extreme, targets)
    assert torch.isfinite(result).all(), result
    result.sum().backward()
    assert torch.isfinite(extreme.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,index", CASES)
def test_low_precision_inputs_computed_in_float32(name, index, dtype):
    spec, params, predictions, targets = make(name, index, torch.float32)
    low = predictions.to(dtype)
    low_targets = targets.to(dtype) if targets.is_floating_point() else targets
    result = losses.build(name, **params, reduction="mean")(low, low_targets)
    assert result.dtype == dtype
    expected = losses.build(name, **params, reduction="mean")(low.float(), low_targets.float() if targets.is_floating_point() else targets)
    assert_close(result, expected, dtype)


@pytest.mark.parametrize("name,index", CASES)
def test_non_contiguous_inputs(name, index):
    spec, params, predictions, targets = make(name, index, spatial=(4, 6))
    module = losses.build(name, **params, reduction="none")
    strided_p, strided_t = predictions[..., ::2], targets[..., ::2]
    assert not strided_p.is_contiguous()
    torch.testing.assert_close(
        module(strided_p, strided_t), module(strided_p.contiguous(), strided_t.contiguous()), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bad_parameters_raise_value_error_naming_them(name):
    spec = losses.get(name)
    with pytest.raises(ValueError, match="no_such_param"):
        losses.build(name, no_such_param=1.0)
    with pytest.raises(ValueError, match="reduction"):
        losses.build(name, reduction="average")
    for param in spec.params:
        if param.kind in ("float", "int", "float_or_vector") and param.low is not None:
            bad = param.low - 1 if param.low_inclusive else param.low
            with pytest.raises(ValueError, match=param.name):
                losses.build(name, **{param.name: bad})
        if param.kind in ("float", "int") and param.high is not None and math.isfinite(param.high):
            bad = param.high + 1 if param.high_inclusive else param.high
            with pytest.raises(ValueError, match=param.name):
                losses.build(name, **{param.name: bad})
        if param.kind == "vector":
            with pytest.raises(ValueError, match=param.name):
                spec_module = losses.build(name, **{param.name: torch.ones(NUM_CLASSES + 2)})
                _, _, p, t = make(name)
                spec_module(p, t)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_weights_that_do_not_broadcast_name_both_shapes(name):
    spec, params, predictions, targets = make(name)
    module = losses.build(name, **params)
    bad = torch.ones(7, 2, dtype=predictions.dtype)
    with pytest.raises(ValueError, match=r"weights.*\[7, 2\]"):
        module(predictions, targets, bad)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="bce_with_logits"):
        losses.build("no_such_loss")
