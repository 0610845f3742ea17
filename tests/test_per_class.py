r"""Per-class results in the library: ``statistics(..., per_class=True)``, ``class_reductions`` and
``loss_service.evaluation.score(..., per_class=True)``.

References: the loss modules on data restricted to one class (its elements through their weights, or its
targets alone through ``ignore_index``; a region loss's class through a one-hot ``class_weight``),
``torch.nn.functional`` per class, and MONAI's ``DiceMetric``. Class totals are additive: shards merged
equal one call, for every loss and setting.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loss_service import evaluation, losses
from loss_service.statistics import merge

from .test_evaluation import BATCH, CASES, case_inputs

REDUCTIONS = ("sum", "mean", "weighted_mean")


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-12)


def class_axis(spec, params, predictions):
    r"""The dimension of the classes of a loss with a class dimension (``class_dim``, else 1)."""
    dim = params.get("class_dim", 1)
    return dim % predictions.dim()


def membership(spec, params, predictions, targets, c):
    r"""How much each element of a loss on class indices or probabilities counts for class ``c``: its target
    class, or its target probability of ``c`` (what the class totals define)."""
    dim = class_axis(spec, params, predictions)
    if targets.dim() < predictions.dim():
        return (targets == c).to(torch.float64)
    return targets.select(dim, c).to(torch.float64)


def channel_alone(spec, params, predictions, targets, weights, c):
    r"""The module's ``[sum, mean, weighted_mean]`` on channel ``c`` of a dense loss alone: the channel of the
    predictions, targets and elementwise weights, entry ``c`` of the per-class vectors."""
    dim = class_axis(spec, params, predictions)
    alone = {name: value[c:c + 1] if isinstance(value, torch.Tensor) and value.dim() == 1 else value
             for name, value in params.items()}
    if weights is not None and weights.shape == predictions.shape:
        weights = weights.narrow(dim, c, 1)
    predictions, targets = predictions.narrow(dim, c, 1), targets.narrow(dim, c, 1)
    return [float(losses.build(spec.name, reduction=reduction, **alone)(predictions, targets, weights))
            for reduction in REDUCTIONS]


def elementwise_reference(spec, params, predictions, targets, weights, c):
    r"""``[sum, mean, weighted_mean]`` of class ``c`` of an elementwise loss from the module on the class's
    elements alone: a dense loss's channel (:func:`channel_alone`); else weights times the class membership
    (sum, weighted_mean), and for ``mean`` the class's ``mean`` denominator (class-index targets: the others
    ignored; probability targets: one per element, split by their probabilities)."""
    if not spec.forms_of(params).index_targets:
        return channel_alone(spec, params, predictions, targets, weights, c)
    share = membership(spec, params, predictions, targets, c)
    restricted = share if weights is None else share * (
        weights.reshape([-1] + [1] * (share.dim() - 1)) if weights.dim() == 1 else weights)
    value = {reduction: float(losses.build(spec.name, reduction=reduction, **params)(predictions, targets, restricted))
             for reduction in ("sum", "weighted_mean")}
    if spec.forms_of(params).index_targets and targets.dim() < predictions.dim():
        ignore_index = params.get("ignore_index", spec.param("ignore_index").default)
        alone = torch.where(targets == c, targets, torch.full_like(targets, ignore_index))
        value["mean"] = float(losses.build(spec.name, reduction="mean", **params)(predictions, alone, weights))
    else:
        counted = float(share.sum())
        value["mean"] = value["sum"] / counted if counted else 0.0
    return [value[reduction] for reduction in REDUCTIONS]


def region_reference(spec, params, predictions, targets, weights, c, num_classes):
    r"""``[sum, mean, weighted_mean]`` of class ``c`` of a region loss: the module with a class weight on class
    ``c`` alone (the sum and weighted mean), the sum over the class's terms for ``mean`` (``N`` per-sample terms,
    or one with ``batch``; none for a dropped background)."""
    class_weight = torch.zeros(num_classes, dtype=torch.float64)
    given = params.get("class_weight")
    class_weight[c] = 1.0 if given is None else float(given[c])
    alone = dict(params, class_weight=class_weight)
    value = {reduction: float(losses.build(spec.name, reduction=reduction, **alone)(predictions, targets, weights))
             for reduction in ("sum", "weighted_mean")}
    dropped = not params.get("include_background", True) and c == 0 and num_classes > 1
    terms = 0 if dropped else (1 if params.get("batch") else predictions.shape[0])
    value["mean"] = value["sum"] / terms if terms else 0.0
    return [value[reduction] for reduction in REDUCTIONS]


def overlap_index_reference(spec, params, predictions, targets, weights):
    r"""Each class's overlap index over the data: 1 - the loss of ``batch=True`` per class, without what turns
    the index into a loss (``log_loss``, ``gamma``) or weights the classes."""
    pooled = dict(params, batch=True, log_loss=False, class_weight=None, include_background=True)
    if "gamma" in spec.param_names():
        pooled["gamma"] = 1.0
    return 1.0 - losses.build(spec.name, reduction="none", **pooled)(predictions, targets, weights)


# Losses whose per-class values these references define: every class-restricted loss (the module docstring).
# generalized_dice and bce_dice have tests of their own below; so has the "skip" rule for absent classes, whose
# class weights depend on the other classes.
RESTRICTED_CASES = [
    case for case in CASES if case.values[0] not in ("generalized_dice", "bce_dice")
    and losses.get(case.values[0]).test_params[case.values[1]].get("absent_classes") != "skip"
]
SKIP_CASES = [
    case for case in CASES if losses.get(case.values[0]).test_params[case.values[1]].get("absent_classes") == "skip"
]


@pytest.mark.parametrize("weight_form", [None, "per_sample", "elementwise"])
@pytest.mark.parametrize("name,index", RESTRICTED_CASES)
def test_each_class_equals_the_loss_of_its_elements_alone(name, index, weight_form):
    spec, params, predictions, targets, weights = case_inputs(name, index, weight_form)
    forms = spec.forms_of(params)
    stats = evaluation.statistics(name, predictions, targets, weights, per_class=True, **params)
    assert stats.class_layout == forms.class_totals_layout()
    module = losses.build(name, **params)
    reductions = module.class_reductions(torch.from_numpy(stats.class_totals))
    num_classes = stats.class_totals.shape[0]
    for c in range(num_classes):
        if forms.class_index:
            expected = region_reference(spec, params, predictions, targets, weights, c, num_classes)
        else:
            expected = elementwise_reference(spec, params, predictions, targets, weights, c)
        for column, reduction in enumerate(REDUCTIONS):
            assert close(float(reductions[c, column]), expected[column]), (c, reduction, reductions[c], expected)
    if forms.class_index:
        expected_index = overlap_index_reference(spec, params, predictions, targets, weights)
        np.testing.assert_allclose(reductions[:, 3].numpy(), expected_index.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,index", SKIP_CASES)
def test_with_absent_classes_skipped_the_classes_split_the_loss(name, index):
    r"""Each sample's classes share its one unit of ``mean`` denominator: the class sums are the columns of
    ``reduction="none"``'s values and add up to the loss's sum, the class denominators to its denominator."""
    spec, params, predictions, targets, weights = case_inputs(name, index, "per_sample")
    stats = evaluation.statistics(name, predictions, targets, weights, per_class=True, **params)
    module = losses.build(name, **params)
    values = losses.build(name, reduction="none", **params)(predictions, targets, weights)
    reductions = module.class_reductions(torch.from_numpy(stats.class_totals))
    columns = values.sum(0) if values.dim() == 2 else values
    np.testing.assert_allclose(reductions[:, 0].numpy(), columns.numpy(), rtol=1e-10, atol=1e-12)
    assert close(float(reductions[:, 0].sum()), float(losses.build(name, reduction="sum", **params)(
        predictions, targets, weights)))
    if not params.get("batch"):
        assert close(float(stats.class_totals[:, 2].sum()), float(stats.totals[2]))


@pytest.mark.parametrize("name,index", CASES)
def test_class_totals_of_shards_merge_into_one_call(name, index):
    spec, params, predictions, targets, weights = case_inputs(name, index, "per_sample", seed=2)
    for reduction in ("mean", "sum", "weighted_mean", "none"):
        whole = evaluation.score(name, predictions, targets, weights, per_class=True, reduction=reduction, **params)
        parts = [
            evaluation.statistics(name, predictions[a:b], targets[a:b], weights[a:b], per_class=True,
                                  reduction=reduction, **params)
            for a, b in [(0, 2), (2, 3), (3, BATCH)]
        ]
        merged = evaluation.evaluate(merge(parts))
        np.testing.assert_allclose(merged.statistics.class_totals, whole.statistics.class_totals, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(merged.class_losses, whole.class_losses, rtol=1e-10, atol=1e-12)
        assert (merged.class_scores is None) == (not spec.forms_of(params).class_index)
        if merged.class_scores is not None:
            np.testing.assert_allclose(merged.class_scores, whole.class_scores, rtol=1e-10, atol=1e-12)
        assert close(merged.loss, whole.loss)


@pytest.mark.parametrize("name,index", CASES)
def test_per_class_changes_no_other_result_and_scripting_gives_the_same(name, index):
    spec, params, predictions, targets, weights = case_inputs(name, index, "elementwise", seed=3)
    group_ids = torch.arange(BATCH) % 3
    plain = evaluation.score(name, predictions, targets, weights, group_ids=group_ids, **params)
    both = evaluation.score(name, predictions, targets, weights, group_ids=group_ids, per_class=True, **params)
    assert both.loss == plain.loss
    np.testing.assert_array_equal(both.group_losses, plain.group_losses)
    module = losses.build(name, **params)
    with torch.no_grad():
        eager = module.statistics(predictions, targets, weights, False, True, True)
        scripted = torch.jit.script(module).statistics(predictions, targets, weights, False, True, True)
    for got, want in zip(scripted, eager):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.jit.script(module).class_reductions(eager[2]), module.class_reductions(eager[2]), rtol=1e-12, atol=1e-12
    )


def test_cross_entropy_per_class_is_torchs_loss_of_each_class_targets():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 5, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (6, 5, 5), generator=generator)
    labels[0, 0] = -100
    class_weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    result = evaluation.score("cross_entropy", logits, labels, per_class=True, class_weight=class_weight,
                              label_smoothing=0.1)
    for c in range(4):
        alone = torch.where(labels == c, labels, torch.full_like(labels, -100))
        expected = F.cross_entropy(logits, alone, weight=class_weight, label_smoothing=0.1)
        assert close(result.class_losses[c], float(expected))
    counts = result.statistics.class_totals[:, 3]
    np.testing.assert_array_equal(counts, [(labels == c).sum() for c in range(4)])


def test_soft_targets_count_for_each_class_by_their_probability():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (5, 4), generator=generator)
    one_hot = F.one_hot(labels, 3).movedim(-1, 1).to(torch.float64)
    by_index = evaluation.score("focal", logits, labels, per_class=True)
    by_probabilities = evaluation.score("focal", logits, one_hot, per_class=True)
    np.testing.assert_allclose(by_probabilities.class_losses, by_index.class_losses, rtol=1e-12)
    soft = torch.softmax(torch.randn(5, 3, 4, generator=generator, dtype=torch.float64), dim=1)
    split = evaluation.statistics("cross_entropy", logits, soft, per_class=True)
    # The shares of an element over its classes add up to the element: the class sums are the total.
    np.testing.assert_allclose(split.class_totals[:, 0].sum(), split.totals[0], rtol=1e-12)
    np.testing.assert_allclose(split.class_totals[:, 3], soft.sum(dim=(0, 2)).numpy(), rtol=1e-12)


def test_binary_losses_per_channel_are_torchs_loss_of_each_channel():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 6, generator=generator, dtype=torch.float64)
    masks = (torch.rand(4, 3, 6, generator=generator) < 0.4).to(torch.float64)
    pos_weight = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    result = evaluation.score("bce_with_logits", logits, masks, per_class=True, pos_weight=pos_weight)
    for c in range(3):
        expected = F.binary_cross_entropy_with_logits(logits[:, c], masks[:, c], pos_weight=pos_weight[c])
        assert close(result.class_losses[c], float(expected))


def test_dice_scores_per_class_are_monais_dice_metric():
    from monai.metrics import DiceMetric

    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (5, 8, 8), generator=generator)
    one_hot = F.one_hot(labels, 3).movedim(-1, 1).to(torch.float64)
    # DiceMetric scores discrete predictions: logits whose softmax is exactly one-hot (exp(-1000) = 0).
    predicted = torch.randint(0, 3, (5, 8, 8), generator=generator)
    probabilities = F.one_hot(predicted, 3).movedim(-1, 1).to(torch.float64)
    logits = 1000.0 * probabilities
    result = evaluation.score("dice", logits, labels, per_class=True, mode="multiclass", smooth_nr=0.0, smooth_dr=0.0)
    # MONAI averages each sample's Dice per class (reduction="mean_batch"): 1 - the class's mean loss.
    per_sample = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    per_sample(y_pred=probabilities, y=one_hot)
    # (MONAI aggregates in float32.)
    np.testing.assert_allclose(1.0 - result.class_losses, per_sample.aggregate().numpy(), rtol=1e-6)
    # The class's index over the data is MONAI's Dice of all the samples as one image.
    pooled = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    pooled(y_pred=probabilities.movedim(0, 1).reshape(1, 3, -1), y=one_hot.movedim(0, 1).reshape(1, 3, -1))
    np.testing.assert_allclose(result.class_scores, pooled.aggregate().numpy(), rtol=1e-6)


def test_generalized_dice_per_class_is_each_class_dice_over_the_data():
    for index, params in enumerate(losses.get("generalized_dice").test_params):
        _, params, predictions, targets, weights = case_inputs("generalized_dice", index, "per_sample")
        result = evaluation.score("generalized_dice", predictions, targets, weights, per_class=True, **params)
        dice = {name: params[name] for name in ("smooth_nr", "smooth_dr", "include_background", "ignore_index",
                                                  "class_weight", "mode") if name in params}
        expected = losses.build("dice", batch=True, reduction="none", **dice)(predictions, targets, weights)
        np.testing.assert_allclose(result.class_losses, expected.numpy(), rtol=1e-10, atol=1e-12)
        index_expected = overlap_index_reference(losses.get("dice"), dice, predictions, targets, weights)
        np.testing.assert_allclose(result.class_scores, index_expected.numpy(), rtol=1e-10, atol=1e-12)


def test_bce_dice_per_class_combines_its_terms_per_class():
    for index, params in enumerate(losses.get("bce_dice").test_params):
        _, params, predictions, targets, weights = case_inputs("bce_dice", index, None)
        result = evaluation.score("bce_dice", predictions, targets, per_class=True, reduction="weighted_mean", **params)
        dice = {name: value for name, value in params.items() if name not in ("pos_weight", "bce_weight", "dice_weight")}
        dice_part = evaluation.score("dice", predictions, targets, per_class=True, reduction="weighted_mean", **dice)
        ignored = targets == params.get("ignore_index", -100)
        kept = (~ignored).to(torch.float64)
        bce_part = []
        for c in range(result.class_losses.shape[0]):
            pos_weight = None if params.get("pos_weight") is None else params["pos_weight"][c]
            terms = F.binary_cross_entropy_with_logits(
                predictions[:, c], torch.where(ignored[:, c], 0.0, targets[:, c]), pos_weight=pos_weight,
                reduction="none",
            )
            bce_part.append(float((terms * kept[:, c]).sum() / kept[:, c].sum()))
        expected = params.get("bce_weight", 1.0) * np.array(bce_part) + params.get("dice_weight", 1.0) * dice_part.class_losses
        np.testing.assert_allclose(result.class_losses, expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(result.class_scores, dice_part.class_scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,index", CASES)
def test_an_empty_batch_has_empty_class_results(name, index):
    spec, params, predictions, targets, _ = case_inputs(name, index, None)
    stats = evaluation.statistics(name, predictions[:0], targets[:0], per_class=True, **params)
    assert (stats.class_totals == 0).all() and stats.class_totals.shape[1] == len(stats.class_layout)
    result = evaluation.evaluate(stats)
    assert np.isfinite(result.class_losses).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_the_float32_class_results(dtype):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3, 16, generator=generator).to(dtype)
    labels = torch.randint(0, 3, (4, 16), generator=generator)
    for name, params in (("cross_entropy", {}), ("dice", {"mode": "multiclass"})):
        half = evaluation.score(name, logits, labels, per_class=True, **params)
        single = evaluation.score(name, logits.float(), labels, per_class=True, **params)
        np.testing.assert_allclose(half.class_losses, single.class_losses, rtol=1e-6)


def test_statistics_per_class_do_not_merge_with_statistics_without_or_of_other_classes():
    logits, labels = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 5))
    with_classes = evaluation.statistics("cross_entropy", logits, labels, per_class=True)
    without = evaluation.statistics("cross_entropy", logits, labels)
    with pytest.raises(ValueError, match=r"statistics\[1\].*per class"):
        merge([with_classes, without])
    four = evaluation.statistics("cross_entropy", torch.randn(4, 4, 5), labels, per_class=True)
    with pytest.raises(ValueError, match="4 classes vs 3"):
        merge([with_classes, four])
