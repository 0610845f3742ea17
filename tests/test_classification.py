r"""Classification losses beyond the generated suite: identities between losses, probability targets,
target shapes, channels-last data, the blog forms of focal's alpha, and bad input."""
import io

import pytest
import torch
import torch.nn.functional as F

from loss_service import losses
from loss_service.losses import (
    BinaryFocalLoss,
    CrossEntropyLoss,
    FocalLoss,
    binary_cross_entropy_with_logits,
    binary_focal_loss,
    cross_entropy_loss,
    focal_loss,
    nll_loss,
)

from .references import REFERENCES

REDUCTIONS = ["none", "sum", "mean", "weighted_mean"]
TIGHT = dict(rtol=1e-10, atol=1e-12)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def logits(*shape, seed=0, scale=2.0):
    return torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale


def class_indices(shape, num_classes=3, seed=1, ignore_index=-100, ignored_fraction=0.2):
    targets = torch.randint(0, num_classes, shape, generator=generator(seed))
    ignored = torch.rand(shape, generator=generator(seed + 1)) < ignored_fraction
    return torch.where(ignored, torch.full_like(targets, ignore_index), targets)


def class_probabilities(shape, seed=2):
    return torch.softmax(logits(*shape, seed=seed), 1)


def value_and_grad(fn, predictions):
    predictions = predictions.detach().clone().requires_grad_(True)
    value = fn(predictions)
    (grad,) = torch.autograd.grad(value.sum(), predictions)
    return value, grad


def assert_same_value_and_grad(fn_a, fn_b, predictions, **tolerance):
    value_a, grad_a = value_and_grad(fn_a, predictions)
    value_b, grad_b = value_and_grad(fn_b, predictions)
    torch.testing.assert_close(value_a, value_b, **(tolerance or TIGHT))
    torch.testing.assert_close(grad_a, grad_b, **(tolerance or TIGHT))


# --- focal with gamma = 0 is cross_entropy -------------------------------------------------------

CE_SETTINGS = [
    {},
    {"class_weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)},
    {"ignore_index": 1},
    {"label_smoothing": 0.2},
    {"class_weight": torch.tensor([1.5, 0.0, 3.0], dtype=torch.float64), "ignore_index": 2, "label_smoothing": 0.1},
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("setting", CE_SETTINGS, ids=lambda s: "-".join(s) or "defaults")
def test_focal_with_gamma_zero_is_cross_entropy(setting, reduction):
    predictions = logits(4, 3, 5)
    targets = class_indices((4, 5), ignore_index=setting.get("ignore_index", -100))
    weights = torch.rand(4, generator=generator(7), dtype=torch.float64) + 0.1
    assert_same_value_and_grad(
        lambda p: focal_loss(p, targets, weights, gamma=0.0, reduction=reduction, **setting),
        lambda p: cross_entropy_loss(p, targets, weights, reduction=reduction, **setting),
        predictions,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_with_gamma_zero_is_cross_entropy_for_probability_targets(reduction):
    predictions = logits(4, 3, 5)
    targets = class_probabilities((4, 3, 5))
    class_weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    assert_same_value_and_grad(
        lambda p: focal_loss(p, targets, gamma=0.0, class_weight=class_weight, label_smoothing=0.1, reduction=reduction),
        lambda p: cross_entropy_loss(p, targets, class_weight=class_weight, label_smoothing=0.1, reduction=reduction),
        predictions,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_alpha_multiplies_class_weight(reduction):
    predictions = logits(4, 3, 5)
    targets = class_indices((4, 5))
    alpha = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    class_weight = torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64)
    assert_same_value_and_grad(
        lambda p: focal_loss(p, targets, gamma=0.0, alpha=alpha, class_weight=class_weight, reduction=reduction),
        lambda p: cross_entropy_loss(p, targets, class_weight=alpha * class_weight, reduction=reduction),
        predictions,
    )


# --- binary_focal ---------------------------------------------------------------------------------

def binary_inputs(shape=(3, 4, 5), seed=0):
    targets = (torch.rand(shape, generator=generator(seed + 1), dtype=torch.float64) < 0.3).to(torch.float64)
    return logits(*shape, seed=seed, scale=3.0), targets


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_focal_with_gamma_zero_and_no_alpha_is_bce_with_logits(reduction):
    predictions, targets = binary_inputs()
    weights = torch.rand(3, generator=generator(5), dtype=torch.float64)
    assert_same_value_and_grad(
        lambda p: binary_focal_loss(p, targets, weights, alpha=-1.0, gamma=0.0, reduction=reduction),
        lambda p: binary_cross_entropy_with_logits(p, targets, weights, reduction=reduction),
        predictions,
    )


def test_binary_focal_with_gamma_zero_and_no_alpha_in_float32_is_bce_with_logits_as_documented():
    r"""docs/losses/classification.md: bitwise equal values in eager PyTorch; within 1e-6 absolute when
    scripted, where the two modules take different stable forms of log σ."""
    predictions = torch.cat([logits(256, 4, seed=3, scale=8.0).float(), torch.linspace(-100, 100, 1024).reshape(-1, 4)])
    targets = (torch.rand(predictions.shape, generator=generator(4)) < 0.5).float()
    focal = losses.build("binary_focal", alpha=-1.0, gamma=0.0, reduction="none")
    bce = losses.build("bce_with_logits", reduction="none")
    assert torch.equal(focal(predictions, targets), bce(predictions, targets))
    scripted = torch.jit.script(focal)(predictions, targets) - torch.jit.script(bce)(predictions, targets)
    assert float(scripted.abs().max()) <= 1e-6


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("smooth_factor", [0.0, 0.05, 0.25, 0.5])
def test_bce_with_logits_label_smoothing_is_smp_soft_bce_at_twice_its_smooth_factor(smooth_factor, reduction):
    r"""segmentation_models_pytorch's SoftBCEWithLogitsLoss(smooth_factor=s) (its own code, pos_weight
    along the last dim as torch's) is label_smoothing = 2s, values and gradients."""
    from bench.bench_peers import smp_losses

    predictions, targets = binary_inputs((3, 5, 4))
    pos_weight = torch.tensor([2.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    smp = smp_losses().SoftBCEWithLogitsLoss(smooth_factor=smooth_factor, pos_weight=pos_weight, reduction=reduction)
    ours = losses.build("bce_with_logits", label_smoothing=2 * smooth_factor, pos_weight=pos_weight, class_dim=-1,
                        reduction=reduction)
    assert_same_value_and_grad(lambda p: ours(p, targets), lambda p: smp(p, targets), predictions)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 0.5), (-1.0, 1.5)])
def test_binary_focal_pos_weight_is_kornias_for_hard_targets(alpha, gamma, reduction):
    r"""kornia's binary_focal_loss_with_logits (its own code) scales the positive term by pos_weight[c] along
    dim 1; for 0/1 targets that is this loss's pos_weight (kornia's alpha=None is alpha < 0 here)."""
    from kornia.losses import binary_focal_loss_with_logits

    predictions, targets = binary_inputs((3, 4, 5))
    pos_weight = torch.tensor([2.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    assert_same_value_and_grad(
        lambda p: binary_focal_loss(p, targets, alpha=alpha, gamma=gamma, pos_weight=pos_weight, reduction=reduction),
        lambda p: binary_focal_loss_with_logits(p, targets, alpha=None if alpha < 0 else alpha, gamma=gamma,
                                                pos_weight=pos_weight, reduction=reduction),
        predictions,
    )


@pytest.mark.parametrize("targets_require_grad", [False, True])
def test_binary_focal_pos_weight_closed_form_backward_is_the_formulas(targets_require_grad):
    r"""Eager training takes the closed-form backward (targets without gradient); the formula with autograd
    (targets with gradient) gives the same loss and logit gradient, pos_weight included."""
    predictions, targets = binary_inputs((4, 3, 6))
    pos_weight = torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64)
    soft = (targets * 0.7 + 0.1).requires_grad_(targets_require_grad)
    closed = predictions.clone().requires_grad_()
    loss = binary_focal_loss(closed, soft.detach(), alpha=0.4, gamma=1.5, pos_weight=pos_weight)
    loss.backward()
    formula = predictions.clone().requires_grad_()
    reference = binary_focal_loss(formula, soft, alpha=0.4, gamma=1.5, pos_weight=pos_weight)
    reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-12) and torch.allclose(closed.grad, formula.grad, rtol=1e-10)
    assert torch.autograd.gradcheck(
        lambda p: binary_focal_loss(p, soft.detach(), alpha=0.4, gamma=1.5, pos_weight=pos_weight), (closed.detach().requires_grad_(),)
    )


def test_bce_with_logits_label_smoothing_is_checked_and_settable_from_torchscript():
    predictions, targets = binary_inputs()
    with pytest.raises(ValueError, match=r"label_smoothing.* must be in \[0, 1\]"):
        losses.build("bce_with_logits", label_smoothing=1.5)
    scripted = torch.jit.script(losses.build("bce_with_logits"))
    scripted.label_smoothing = 0.3
    expected = F.binary_cross_entropy_with_logits(predictions, targets * 0.7 + 0.15)
    assert torch.allclose(scripted(predictions, targets), expected, rtol=1e-12)
    scripted.label_smoothing = -0.1
    with pytest.raises(torch.jit.Error, match=r"label_smoothing must be in \[0, 1\], got -0.1"):
        scripted(predictions, targets)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.9, 0.7), (-1.0, 3.0), (0.0, 1.0), (1.0, 2.5)])
def test_binary_focal_matches_torchvision_formula(alpha, gamma, reduction):
    predictions, targets = binary_inputs()
    # Soft targets are allowed by torchvision's formula too.
    soft = targets * 0.8 + 0.1

    def torchvision_formula(p, t):
        prob = torch.sigmoid(p)
        ce = F.binary_cross_entropy_with_logits(p, t, reduction="none")
        p_t = prob * t + (1 - prob) * (1 - t)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
        return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]

    for t in (targets, soft):
        assert_same_value_and_grad(
            lambda p: binary_focal_loss(p, t, alpha=alpha, gamma=gamma, reduction=reduction),
            lambda p: torchvision_formula(p, t),
            predictions,
        )


def test_binary_focal_is_per_element_not_on_the_batch_mean():
    # The blog variant alpha * (1 - exp(-BCE_mean))**gamma * BCE_mean differs from the paper's loss.
    predictions, targets = binary_inputs()
    bce_mean = F.binary_cross_entropy_with_logits(predictions, targets)
    blog = 0.25 * (1 - torch.exp(-bce_mean)) ** 2 * bce_mean
    ours = binary_focal_loss(predictions, targets, alpha=0.25, gamma=2.0)
    assert not torch.allclose(ours, blog, rtol=1e-3)


def test_binary_focal_extreme_logits_with_fractional_gamma_have_finite_gradients():
    predictions = torch.tensor([[1e4, -1e4, 1e4, -1e4, 0.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])
    for gamma in (0.0, 0.3, 1.0, 2.5):
        loss = binary_focal_loss(predictions, targets, gamma=gamma, reduction="sum")
        (grad,) = torch.autograd.grad(loss, predictions)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), gamma
        # The confidently wrong elements cost about alpha_t * 1e4 each.
        torch.testing.assert_close(loss, torch.tensor(0.75 * 1e4 + 0.25 * 1e4 + 0.25 * 0.5**gamma * 0.6931471805599453))


# --- the blog forms of focal's alpha -------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_scalar_alpha_with_balance_index_is_the_vector_form(reduction):
    predictions = logits(4, 3, 5)
    targets = class_indices((4, 5))
    vector = torch.tensor([0.4, 0.4, 0.6], dtype=torch.float64)
    assert_same_value_and_grad(
        lambda p: focal_loss(p, targets, gamma=1.5, alpha=0.6, balance_index=2, reduction=reduction),
        lambda p: focal_loss(p, targets, gamma=1.5, alpha=vector, reduction=reduction),
        predictions,
    )


def test_focal_module_accepts_the_blog_constructor_forms():
    predictions = logits(4, 3, 5)
    targets = class_indices((4, 5), ignored_fraction=0.0)
    from_float = FocalLoss(alpha=0.6, gamma=2, balance_index=0)
    from_list = FocalLoss(alpha=[0.6, 0.4, 0.4], gamma=2)
    built = losses.build("focal", alpha=[0.6, 0.4, 0.4], gamma=2.0)
    expected = from_list(predictions, targets)
    torch.testing.assert_close(from_float(predictions, targets), expected, **TIGHT)
    # ParamSpec.validate stores a list as float32.
    torch.testing.assert_close(built(predictions, targets), expected, rtol=1e-6, atol=1e-7)
    scripted = torch.jit.script(from_float)
    torch.testing.assert_close(scripted(predictions, targets), expected, **TIGHT)


def test_focal_normalising_a_vector_alpha_cancels_in_mean_and_matches_the_blog_sum():
    predictions = logits(6, 3, 4)
    targets = class_indices((6, 4), ignored_fraction=0.0)
    alpha = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    normalised = alpha / alpha.sum()
    torch.testing.assert_close(
        focal_loss(predictions, targets, alpha=alpha, gamma=2.0),
        focal_loss(predictions, targets, alpha=normalised, gamma=2.0),
        **TIGHT,
    )
    # The blog's value: mean over elements of -alpha_t (1 - p_t)^gamma log p_t, alpha summing to 1.
    log_p_t = torch.log_softmax(predictions, 1).gather(1, targets.unsqueeze(1)).squeeze(1)
    blog = (-normalised[targets] * (1 - log_p_t.exp()) ** 2.0 * log_p_t).mean()
    ours_sum = focal_loss(predictions, targets, alpha=normalised, gamma=2.0, reduction="sum")
    torch.testing.assert_close(ours_sum / targets.numel(), blog, **TIGHT)


@pytest.mark.parametrize("bad,match", [
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": 0.5, "balance_index": 3}, "balance_index"),
    ({"alpha": torch.ones(4)}, "alpha"),
    ({"gamma": -1.0}, "gamma"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"class_weight": torch.ones(2)}, "class_weight"),
])
def test_focal_bad_parameters_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        focal_loss(logits(2, 3, 4), class_indices((2, 4)), **bad)


def test_focal_extreme_logits_with_fractional_gamma_have_finite_gradients():
    predictions = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4]], requires_grad=True)
    targets = torch.tensor([0, 0])
    for gamma in (0.0, 0.25, 1.0, 2.5):
        for smoothing in (0.0, 0.1):
            loss = focal_loss(predictions, targets, gamma=gamma, label_smoothing=smoothing, reduction="sum")
            (grad,) = torch.autograd.grad(loss, predictions)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (gamma, smoothing)
    # Well-classified: (1 - p_t)^gamma is (nearly) 0; misclassified by 2e4: about 2e4.
    torch.testing.assert_close(focal_loss(predictions, targets, gamma=2.0, reduction="none"), torch.tensor([0.0, 2e4]))


# --- cross_entropy with probability targets ------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("setting", [
    {},
    {"label_smoothing": 0.15},
    {"weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)},
    {"weight": torch.tensor([1.5, 0.0, 3.0], dtype=torch.float64), "label_smoothing": 0.3},
], ids=["defaults", "smoothing", "class_weight", "class_weight-smoothing"])
def test_cross_entropy_probability_targets_match_torch(setting, reduction):
    predictions = logits(4, 3, 2, 5)
    targets = class_probabilities((4, 3, 2, 5))
    ours = dict(setting)
    if "weight" in ours:
        ours["class_weight"] = ours.pop("weight")
    # ignore_index is irrelevant for probability targets, as in torch.
    assert_same_value_and_grad(
        lambda p: cross_entropy_loss(p, targets, reduction=reduction, ignore_index=0, **ours),
        lambda p: F.cross_entropy(p, targets, reduction=reduction, **setting),
        predictions,
    )


@pytest.mark.parametrize("name", ["cross_entropy", "focal"])
def test_probability_targets_statistics_weights_and_script(name):
    predictions = logits(5, 3, 4)
    targets = class_probabilities((5, 3, 4))
    weights = torch.rand(5, generator=generator(3), dtype=torch.float64) + 0.1
    params = {"class_weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), "label_smoothing": 0.1}
    module = losses.build(name, **params)
    _, totals, sample_totals = module.statistics(predictions, targets, weights, True)
    torch.testing.assert_close(sample_totals.sum(0), totals, **TIGHT)
    for reduction in REDUCTIONS:
        eager = losses.build(name, **params, reduction=reduction)
        expected = REFERENCES[name](predictions, targets, weights, params, reduction)
        torch.testing.assert_close(eager(predictions, targets, weights), expected, **TIGHT)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(eager), buffer)
        buffer.seek(0)
        scripted = torch.jit.load(buffer)
        assert_same_value_and_grad(
            lambda p: scripted(p, targets, weights), lambda p: eager(p, targets, weights), predictions
        )
    small = predictions[:2, :, :2].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: module(p, targets[:2, :, :2], weights[:2]), (small,))


def test_cross_entropy_probability_targets_in_low_precision():
    predictions = logits(4, 3, 5).to(torch.bfloat16)
    targets = class_probabilities((4, 3, 5)).to(torch.bfloat16)
    result = cross_entropy_loss(predictions, targets, label_smoothing=0.1)
    assert result.dtype == torch.bfloat16
    expected = F.cross_entropy(predictions.float(), targets.float(), label_smoothing=0.1)
    torch.testing.assert_close(result.float(), expected, rtol=1e-2, atol=1e-2)


# --- target shapes, channels-last, ignore -----------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(6,), (3, 2, 4)], ids=["N", "N-d1-d2"])
def test_cross_entropy_and_nll_on_target_shapes(shape, reduction):
    predictions = logits(shape[0], 4, *shape[1:])
    targets = class_indices(shape, num_classes=4, ignore_index=3)
    class_weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    kwargs = dict(weight=class_weight, ignore_index=3, reduction=reduction)
    assert_same_value_and_grad(
        lambda p: cross_entropy_loss(p, targets, class_weight=class_weight, ignore_index=3, label_smoothing=0.2,
                                     reduction=reduction),
        lambda p: F.cross_entropy(p, targets, label_smoothing=0.2, **kwargs),
        predictions,
    )
    log_p = torch.log_softmax(predictions, 1)
    assert_same_value_and_grad(
        lambda p: nll_loss(p, targets, class_weight=class_weight, ignore_index=3, reduction=reduction),
        lambda p: F.nll_loss(p, targets, **kwargs),
        log_p,
    )


def test_per_sample_weights_apply_along_dim_0_for_any_target_rank():
    predictions = logits(3, 3, 2, 4)
    targets = class_indices((3, 2, 4))
    per_sample = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            cross_entropy_loss(predictions, targets, per_sample, reduction=reduction),
            cross_entropy_loss(predictions, targets, per_sample.reshape(3, 1, 1).expand(3, 2, 4), reduction=reduction),
            **TIGHT,
        )
    with pytest.raises(ValueError, match=r"weights.*\[2, 4, 1\].*\[3, 2, 4\]"):
        cross_entropy_loss(predictions, targets, torch.ones(2, 4, 1, dtype=torch.float64))


CHANNELS_LAST = [
    ("cross_entropy", {"class_weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), "label_smoothing": 0.1}, "index"),
    ("cross_entropy", {"class_weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)}, "probabilities"),
    ("nll", {"class_weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), "ignore_index": 1}, "index"),
    ("focal", {"alpha": 0.3, "balance_index": 1, "gamma": 1.5, "label_smoothing": 0.1}, "index"),
    ("focal", {"alpha": torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)}, "probabilities"),
    ("binary_focal", {"class_weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), "gamma": 0.5}, "binary"),
]


@pytest.mark.parametrize("reduction", ["none", "mean", "weighted_mean"])
@pytest.mark.parametrize("name,params,target_kind", CHANNELS_LAST, ids=lambda x: x if isinstance(x, str) else "")
def test_class_dim_last_equals_moving_the_class_dim(name, params, target_kind, reduction):
    channels_first = logits(3, 3, 4)
    if target_kind == "index":
        targets_first = targets_last = class_indices((3, 4), ignore_index=params.get("ignore_index", -100))
    elif target_kind == "probabilities":
        targets_first = class_probabilities((3, 3, 4))
        targets_last = targets_first.movedim(1, -1)
    else:
        targets_first = (torch.rand(3, 3, 4, generator=generator(4)) < 0.3).double()
        targets_last = targets_first.movedim(1, -1)
    if name == "nll":
        channels_first = torch.log_softmax(channels_first, 1)
    first = losses.build(name, **params, reduction=reduction)
    last = losses.build(name, **params, reduction=reduction, class_dim=-1)
    expected = first(channels_first, targets_first)
    actual = last(channels_first.movedim(1, -1).contiguous(), targets_last)
    if reduction == "none" and target_kind == "binary":
        actual = actual.movedim(-1, 1)
    torch.testing.assert_close(actual, expected, **TIGHT)


def test_class_weight_shaped_to_broadcast_keeps_its_meaning():
    predictions = logits(3, 3, 4, 5)
    targets = class_indices((3, 4, 5))
    vector = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        cross_entropy_loss(predictions, targets, class_weight=vector.reshape(3, 1, 1)),
        cross_entropy_loss(predictions, targets, class_weight=vector),
        **TIGHT,
    )


@pytest.mark.parametrize("name", ["cross_entropy", "nll", "focal"])
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_all_targets_ignored_gives_zero_with_finite_gradients(name, ignore_index):
    predictions = logits(3, 3, 4)
    if name == "nll":
        predictions = torch.log_softmax(predictions, 1)
    targets = torch.full((3, 4), ignore_index)
    params = {"class_weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), "ignore_index": ignore_index}
    if name != "nll":
        params["label_smoothing"] = 0.2
    for reduction in ["mean", "sum", "weighted_mean", "none"]:
        module = losses.build(name, **params, reduction=reduction)
        value, grad = value_and_grad(lambda p: module(p, targets), predictions)
        assert torch.count_nonzero(value) == 0 and torch.count_nonzero(grad) == 0, reduction
        assert torch.isfinite(grad).all()


def test_cross_entropy_is_finite_where_torch_is_for_minus_infinity_logits():
    # A masked-out (-inf) class that is not the target: torch's loss and gradient are finite.
    predictions = torch.tensor([[2.0, -float("inf"), 0.5], [0.1, 0.2, -float("inf")]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    for reduction in ["none", "sum", "mean"]:
        assert_same_value_and_grad(
            lambda p: cross_entropy_loss(p, targets, reduction=reduction),
            lambda p: F.cross_entropy(p, targets, reduction=reduction),
            predictions,
        )
        value, grad = value_and_grad(lambda p: focal_loss(p, targets, gamma=2.0, reduction=reduction), predictions)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def test_extreme_logits_match_torch_for_cross_entropy():
    signs = torch.where(torch.randn(4, 3, 5, generator=generator(9)) > 0, 1.0, -1.0)
    predictions = signs * 1e4
    targets = class_indices((4, 5))
    assert_same_value_and_grad(
        lambda p: cross_entropy_loss(p, targets, label_smoothing=0.1),
        lambda p: F.cross_entropy(p, targets, label_smoothing=0.1),
        predictions,
        rtol=1e-6,
        atol=1e-3,
    )


# --- bad targets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cross_entropy", "nll", "focal"])
def test_bad_class_index_targets_raise_value_error(name):
    predictions = logits(2, 3, 4)
    module = losses.build(name)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*got 3"):
        module(predictions, torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*got -1"):
        module(predictions, torch.tensor([[0, 1, 2, -1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="integer class indices"):
        module(predictions, torch.tensor([[0.0, 1.5, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="integer class indices"):
        module(predictions, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"targets of shape \[2, 5\].*predictions of shape \[2, 3, 4\]"):
        module(predictions, torch.zeros(2, 5, dtype=torch.long))
    # Integer-valued floating-point targets and other integer dtypes are class indices.
    integral = torch.tensor([[0, 1, 2, -100], [2, 2, 1, 0]])
    expected = module(predictions, integral)
    torch.testing.assert_close(module(predictions, integral.double()), expected, **TIGHT)
    torch.testing.assert_close(module(predictions, integral.int()), expected, **TIGHT)


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4), (2, 3, 2, 3), (2, 3, 2, 1, 2)], ids=["rows", "1d", "2d", "3d"])
@pytest.mark.parametrize("recorded", [False, True], ids=["inference", "autograd"])
def test_class_index_sums_of_every_spatial_rank(name, shape, recorded):
    # The totals of the mean come from torch's nll kernels (rows, images, any other rank reshaped); without
    # autograd the CPU kernel alone checks the indices: its error is ours, and an ignored position's NaN
    # logits reach no sum.
    predictions = logits(*shape)
    if name == "nll":
        predictions = torch.log_softmax(predictions, 1)
    targets = class_indices(shape[:1] + shape[2:])
    targets.view(-1)[0] = -100
    weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    module = losses.build(name, class_weight=weight)
    reference = F.cross_entropy if name == "cross_entropy" else F.nll_loss
    poisoned = predictions.clone()
    poisoned[(0, slice(None)) + (0,) * (len(shape) - 2)] = float("nan")
    expected = reference(predictions, targets, weight)
    with torch.set_grad_enabled(recorded):
        loss = module(poisoned.requires_grad_(recorded), targets)
    torch.testing.assert_close(loss, expected, **TIGHT)
    if recorded:
        clean = predictions.clone().requires_grad_()
        (expected_grad,) = torch.autograd.grad(reference(clean, targets, weight), clean)
        torch.testing.assert_close(torch.autograd.grad(loss, poisoned)[0], expected_grad, **TIGHT)
    bad = targets.clone()
    bad.view(-1)[1] = 3
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\) or ignore_index \(-100\), got 3"):
        module(predictions.requires_grad_(recorded), bad)


def test_probability_targets_must_have_the_predictions_shape():
    with pytest.raises(ValueError, match=r"targets must have the shape of predictions.*\[2, 3, 4\].*\[2, 3, 5\]"):
        cross_entropy_loss(logits(2, 3, 4), torch.zeros(2, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"targets of shape \[2, 3, 4\]"):
        nll_loss(logits(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long))


def test_modules_are_typed_and_scriptable_with_settable_attributes():
    module = torch.jit.script(FocalLoss(gamma=2.0, alpha=torch.tensor([0.2, 0.3, 0.5])))
    predictions = logits(2, 3, 4).float()
    targets = class_indices((2, 4))
    module.gamma = 0.0  # what C++ does with module.setattr("gamma", 0.0)
    expected = CrossEntropyLoss(class_weight=torch.tensor([0.2, 0.3, 0.5]))(predictions, targets)
    torch.testing.assert_close(module(predictions, targets), expected)
    binary = torch.jit.script(BinaryFocalLoss(alpha=-1.0, gamma=0.0))
    p, t = binary_inputs((2, 3))
    torch.testing.assert_close(binary(p, t), F.binary_cross_entropy_with_logits(p, t), **TIGHT)


def _backward_nodes(output):
    r"""Names of every node of ``output``'s autograd graph."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("name, params, closed_form", [
    ("bce", {}, "BinaryCrossEntropyBackward"),
    ("binary_focal", {}, "BinaryFocalBackward"),
    ("focal", {"gamma": 2.0, "ignore_index": -100}, "SoftmaxTargetTermBackward"),
    ("cross_entropy", {"class_weight": torch.tensor([0.5, 2.0, 1.0])}, "SoftmaxTargetTermBackward"),
    ("dice", {"mode": "multiclass", "ignore_index": 255}, "ClassIndexOverlapBackward"),
    ("tversky", {"mode": "multiclass", "alpha": 0.3, "beta": 0.7, "squared_pred": True}, "ClassIndexOverlapBackward"),
])
@pytest.mark.parametrize("spatial", [(5,), ()], ids=["classes-not-last", "classes-last"])
def test_eager_training_takes_the_closed_form_backward_with_the_formulas_gradient(name, params, closed_form, spatial):
    r"""Eager autograd runs losses/_autograd.py's closed-form backward; TorchScript keeps the formula and
    autograd's derivative of it: the two gradients agree in float64, for finite and extreme logits, with
    the classes along an inner dimension (log-softmax form) and along the last (logsumexp form)."""
    spec = losses.get(name)
    predictions, targets = spec.make_inputs(4, 3, spatial, generator(), torch.float64, params)
    # Extremes: logits of ±1e4, or probabilities of exactly 0 and 1.
    extreme = predictions.round() if spec.predictions == "probabilities" else predictions.sign() * 1e4
    predictions = torch.cat([predictions, extreme], dim=0)
    targets = torch.cat([targets, targets], dim=0)
    module = losses.build(name, **params)
    leaf = predictions.clone().requires_grad_(True)
    loss = module(leaf, targets, torch.rand(8, generator=generator(3), dtype=torch.float64))
    assert closed_form in _backward_nodes(loss)
    (eager_grad,) = torch.autograd.grad(loss, leaf)
    scripted_leaf = predictions.clone().requires_grad_(True)
    scripted = torch.jit.script(module)(scripted_leaf, targets, torch.rand(8, generator=generator(3), dtype=torch.float64))
    assert closed_form not in _backward_nodes(scripted)
    (scripted_grad,) = torch.autograd.grad(scripted, scripted_leaf)
    assert torch.isfinite(eager_grad).all()
    torch.testing.assert_close(eager_grad, scripted_grad, **TIGHT)


def test_binary_focal_keeps_the_gradient_of_soft_targets():
    r"""Soft targets that require a gradient (distillation) take the formula, which differentiates them."""
    x = logits(6, 3)
    soft = torch.rand(6, 3, generator=generator(2), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: binary_focal_loss(x, t, gamma=1.5), (soft,))


def _with_ignored(targets, ignore_index, seed=7):
    ignored = torch.rand(targets.shape, generator=generator(seed)) < 0.3
    return torch.where(ignored, torch.full_like(targets, ignore_index), targets)


def test_bce_with_logits_ignore_index_is_smps_own_test_number():
    r"""segmentation_models_pytorch's tests/test_losses.py::test_soft_bce_loss: SoftBCEWithLogitsLoss(smooth_factor=0.1,
    ignore_index=-100) gives 0.7201 (its mean counts the ignored element: ignored_in_mean)."""
    predictions = torch.tensor([-9, 9, 1, 9, -9]).float()
    targets = torch.tensor([0, 1, -100, 1, 0]).float()
    smp_mean = losses.build("bce_with_logits", label_smoothing=0.2, ignore_index=-100, ignored_in_mean=True)
    assert float(smp_mean(predictions, targets)) == pytest.approx(0.7201, abs=1e-4)
    # This project's mean, as torch's cross_entropy: over the four elements that are not ignored.
    ours = losses.build("bce_with_logits", label_smoothing=0.2, ignore_index=-100)
    assert float(ours(predictions, targets)) == pytest.approx(0.7201 * 5 / 4, abs=1e-4)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ignore_index", [-100, 255])
def test_bce_with_logits_ignore_index_is_smps_soft_bce(ignore_index, reduction):
    r"""segmentation_models_pytorch's SoftBCEWithLogitsLoss(ignore_index=...) (its own code): values and gradients."""
    from bench.bench_peers import smp_losses

    predictions, targets = binary_inputs((3, 5, 4))
    targets = _with_ignored(targets, ignore_index)
    smp = smp_losses().SoftBCEWithLogitsLoss(smooth_factor=0.1, ignore_index=ignore_index, reduction=reduction)
    ours = losses.build("bce_with_logits", label_smoothing=0.2, ignore_index=ignore_index, ignored_in_mean=True,
                        reduction=reduction)
    assert_same_value_and_grad(lambda p: ours(p, targets), lambda p: smp(p, targets), predictions)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.5)])
def test_binary_focal_ignore_index_is_kornias(alpha, gamma, reduction):
    r"""kornia's binary_focal_loss_with_logits(ignore_index=...) (its own code; 0/1 targets, its mean over every
    element: ignored_in_mean), values and gradients."""
    from kornia.losses import binary_focal_loss_with_logits

    predictions, targets = binary_inputs((3, 4, 5))
    targets = _with_ignored(targets, -100)
    assert_same_value_and_grad(
        lambda p: binary_focal_loss(p, targets, alpha=alpha, gamma=gamma, ignore_index=-100, ignored_in_mean=True,
                                    reduction=reduction),
        lambda p: binary_focal_loss_with_logits(p, targets, alpha=None if alpha < 0 else alpha, gamma=gamma,
                                                ignore_index=-100, reduction=reduction),
        predictions,
    )


@pytest.mark.parametrize("name", ["bce_with_logits", "binary_focal"])
def test_ignored_positions_hold_any_garbage_without_poisoning_the_gradient(name):
    predictions, targets = binary_inputs((2, 3, 6))
    targets = _with_ignored(targets, 255)
    ignored = targets == 255
    garbage = torch.where(ignored, torch.tensor(float("nan"), dtype=predictions.dtype), predictions)
    garbage = torch.where(ignored & (torch.arange(6) % 2 == 0), torch.tensor(float("inf"), dtype=predictions.dtype), garbage)
    for ignored_in_mean in (False, True):
        module = losses.build(name, ignore_index=255, ignored_in_mean=ignored_in_mean)
        clean = predictions.clone().requires_grad_()
        dirty = garbage.clone().requires_grad_()
        expected, actual = module(clean, targets), module(dirty, targets)
        actual.backward()
        expected.backward()
        assert torch.equal(actual, expected) and torch.isfinite(dirty.grad).all()
        assert torch.equal(dirty.grad, clean.grad) and bool((dirty.grad[ignored] == 0).all())


@pytest.mark.parametrize("name", ["bce_with_logits", "binary_focal"])
def test_an_unset_ignore_index_ignores_nothing_and_is_settable_from_torchscript(name):
    predictions, targets = binary_inputs((2, 3, 4))
    plain = losses.build(name)
    scripted = torch.jit.script(losses.build(name))
    assert plain.ignore_index is None
    assert torch.allclose(scripted(predictions, targets), plain(predictions, targets), rtol=1e-12)
    with_ignored = _with_ignored(targets, 255)
    scripted.ignore_index = 255
    expected = losses.build(name, ignore_index=255)(predictions, with_ignored)
    assert torch.allclose(scripted(predictions, with_ignored), expected, rtol=1e-12)
    scripted.ignored_in_mean = True
    assert torch.allclose(scripted(predictions, with_ignored),
                          losses.build(name, ignore_index=255, ignored_in_mean=True)(predictions, with_ignored), rtol=1e-12)
    with pytest.raises(ValueError, match="ignore_index"):
        losses.build(name, ignore_index=-(2 ** 63))
