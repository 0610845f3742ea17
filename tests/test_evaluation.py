r"""Per-group results and mergeable statistics in the library (loss_service.evaluation, loss_service.statistics).

The references are the loss modules themselves on each group's samples alone, and on all the data at once:
a group's loss must equal scoring that group alone, and merged statistics of any split the value of one
call on everything, for every loss, setting, reduction and weight form, region losses with ``batch=True``
included.
"""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loss_service import codec, evaluation, losses
from loss_service.statistics import MAX_GROUPS, STATISTICS_VERSION, Statistics, merge
from loss_service.v1 import loss_service_pb2 as pb

BATCH = 7
REDUCTIONS = ("mean", "sum", "weighted_mean", "none")
GROUP_IDS = torch.tensor([40, -3, 40, 7, -3, 40, 2 ** 40])
CASES = [
    pytest.param(spec.name, index, id=f"{spec.name}-{index}")
    for spec in losses.specs() for index in range(len(spec.test_params))
]


def case_inputs(name, index, weight_form, seed=0):
    spec = losses.get(name)
    params = dict(spec.test_params[index])
    generator = torch.Generator().manual_seed(seed)
    predictions, targets = spec.make_inputs(BATCH, 3, (5,), generator, torch.float64, params)
    weights = None
    if weight_form == "per_sample":
        weights = torch.rand(BATCH, generator=generator, dtype=torch.float64) + 0.1
    elif weight_form == "elementwise":
        shape = predictions.shape if spec.pixel_weights else losses.build(name, reduction="none", **params)(
            predictions, targets).shape
        weights = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.1
    return spec, params, predictions, targets, weights


def module_value(name, params, reduction, predictions, targets, weights):
    r"""The reference: the loss module; for ``none`` its ``sum`` reduction, as per-sample values, streams and
    merges report it (the ``sum`` of ``bce_dice`` is not the sum of its per-sample values)."""
    return float(losses.build(name, reduction="sum" if reduction == "none" else reduction, **params)(
        predictions, targets, weights))


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-11, abs_tol=1e-12)


@pytest.mark.parametrize("weight_form", [None, "per_sample", "elementwise"])
@pytest.mark.parametrize("name,index", CASES)
def test_each_group_equals_the_group_scored_alone(name, index, weight_form):
    spec, params, predictions, targets, weights = case_inputs(name, index, weight_form)
    for reduction in REDUCTIONS:
        result = evaluation.score(name, predictions, targets, weights, group_ids=GROUP_IDS, reduction=reduction, **params)
        assert list(result.group_ids) == [-3, 7, 40, 2 ** 40]
        for label, group_loss in zip(result.group_ids, result.group_losses):
            rows = GROUP_IDS == int(label)
            alone = module_value(name, params, reduction, predictions[rows], targets[rows],
                                 None if weights is None else weights[rows])
            assert close(group_loss, alone), (reduction, int(label), group_loss, alone)
        assert close(result.loss, module_value(name, params, reduction, predictions, targets, weights))


@pytest.mark.parametrize("name,index", CASES)
def test_merged_shards_equal_one_call_on_everything(name, index):
    spec, params, predictions, targets, weights = case_inputs(name, index, "per_sample", seed=1)
    for reduction in ("mean", "sum", "weighted_mean"):
        whole = evaluation.score(name, predictions, targets, weights, group_ids=GROUP_IDS, reduction=reduction, **params)
        # Three workers with uneven shards, the last one split again and merged first (a tree of merges).
        shards = [(0, 1), (1, 4), (4, 6), (6, 7)]
        parts = [
            evaluation.statistics(name, predictions[a:b], targets[a:b], weights[a:b], group_ids=GROUP_IDS[a:b],
                                  reduction=reduction, **params)
            for a, b in shards
        ]
        merged = evaluation.evaluate(merge([parts[0], parts[1], merge(parts[2:])]))
        assert close(merged.loss, whole.loss) and close(merged.loss, module_value(name, params, reduction, predictions, targets, weights))
        assert (merged.weight_sum, merged.denominator, merged.num_elements) == pytest.approx(
            (whole.weight_sum, whole.denominator, whole.num_elements), rel=1e-12)
        np.testing.assert_array_equal(merged.group_ids, whole.group_ids)
        np.testing.assert_allclose(merged.group_losses, whole.group_losses, rtol=1e-11, atol=1e-12)
        assert merged.statistics.num_batches == len(shards)


def test_statistics_name_their_layout():
    logits = torch.randn(2, 3, 4)
    dice = evaluation.statistics("dice", logits, torch.randint(0, 3, (2, 4)), mode="multiclass", batch=True)
    assert dice.layout == tuple(f"{name}[{c}]" for name in ("true_positive", "predicted", "target") for c in range(3))
    focal = evaluation.statistics("focal", logits, torch.randint(0, 3, (2, 4)))
    assert focal.layout == ("loss_sum", "weight_sum", "denominator", "count")
    combo = evaluation.statistics("bce_dice", logits, torch.rand(2, 3, 4).round(), mode="multilabel", batch=True)
    assert combo.layout[:4] == ("bce.loss_sum", "bce.weight_sum", "bce.denominator", "bce.count")
    assert combo.layout[4:] == tuple(f"dice.{name}[{c}]" for name in ("true_positive", "predicted", "target") for c in range(3))


def test_statistics_hold_every_parameter_with_its_default():
    logits, targets = torch.randn(2, 3), torch.randint(0, 3, (2,))
    default = evaluation.statistics("focal", logits, targets)
    explicit = evaluation.statistics("focal", logits, targets, gamma=2.0, ignore_index=-100)
    assert default.settings() == explicit.settings()
    assert set(default.params) == {p.name for p in losses.get("focal").params if p.name != "reduction" and p.default is not None}
    merge([default, explicit])


@pytest.mark.parametrize("change,what", [
    (dict(loss="cross_entropy"), "loss 'cross_entropy' vs 'focal'"),
    (dict(gamma=3.0), "parameter 'gamma' 3.0 vs 2.0"),
    (dict(class_weight=[1.0, 2.0, 3.0]), "parameter 'class_weight'"),
    (dict(reduction="sum"), "reduction 'sum' vs 'mean'"),
])
def test_statistics_of_different_settings_are_not_merged(change, what):
    logits, targets = torch.randn(4, 3), torch.randint(0, 3, (4,))
    first = evaluation.statistics("focal", logits, targets)
    loss = change.pop("loss", "focal")
    other = evaluation.statistics(loss, logits, targets, **change)
    with pytest.raises(ValueError, match=r"statistics\[1\]: cannot be merged with statistics\[0\]") as raised:
        merge([first, other])
    assert what in str(raised.value)


def test_grouped_and_ungrouped_statistics_are_not_merged():
    logits, targets = torch.randn(4, 3), torch.randint(0, 3, (4,))
    grouped = evaluation.statistics("focal", logits, targets, group_ids=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"statistics\[1\]: statistics\[0\] are per group and statistics\[1\] are not"):
        merge([grouped, evaluation.statistics("focal", logits, targets)])
    with pytest.raises(ValueError, match="at least one"):
        merge([])


@pytest.mark.parametrize("group_ids,message", [
    (torch.tensor([0.0, 1.0, 0.0]), "group_ids must be integer labels"),
    (torch.tensor([True, False, True]), "group_ids must be integer labels"),
    (torch.tensor([0, 1]), r"shape \(3,\), got \[2\]"),
    (torch.tensor([[0, 1, 2]]), r"shape \(3,\), got \[1, 3\]"),
])
def test_group_ids_must_be_one_integer_label_per_sample(group_ids, message):
    with pytest.raises(ValueError, match=message):
        evaluation.score("mse", torch.randn(3, 2), torch.randn(3, 2), group_ids=group_ids)


def test_the_number_of_groups_is_bounded():
    count = MAX_GROUPS + 1
    with pytest.raises(ValueError, match=f"group_ids: {count} distinct groups; expected at most {MAX_GROUPS}"):
        evaluation.score("mse", torch.zeros(count, 1), torch.zeros(count, 1), group_ids=torch.arange(count))
    halves = [evaluation.statistics("mse", torch.zeros(count // 2 + 1, 1), torch.zeros(count // 2 + 1, 1),
                                    group_ids=torch.arange(count // 2 + 1) + offset) for offset in (0, count // 2 + 1)]
    with pytest.raises(ValueError, match="distinct groups"):
        merge(halves)


def test_a_merge_refuses_sums_past_the_wire_types():
    part = evaluation.statistics("mse", torch.ones(2, 1), torch.zeros(2, 1), group_ids=[1, 2])
    with pytest.raises(ValueError, match="batches in all"):
        merge([replace(part, num_batches=2**62), replace(part, num_batches=2**62)])
    huge = replace(part, totals=np.full(4, 1.5e308))
    with pytest.raises(ValueError, match="overflow float64"):
        merge([huge, huge])
    huge_group = replace(part, group_totals=np.full((2, 4), 1.5e308))
    with pytest.raises(ValueError, match="overflow float64"):
        merge([huge_group, huge_group])


def test_an_empty_batch_has_no_groups_and_merges():
    empty = evaluation.statistics("focal", torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), group_ids=torch.zeros(0, dtype=torch.int64))
    assert empty.group_ids.shape == (0,) and empty.group_totals.shape == (0, 4)
    full = evaluation.statistics("focal", torch.randn(2, 3), torch.tensor([0, 2]), group_ids=[5, 5])
    merged = evaluation.evaluate(merge([empty, full]))
    assert list(merged.group_ids) == [5] and close(merged.loss, evaluation.evaluate(full).loss)


# -- the Statistics message ---------------------------------------------------------------------------

def test_statistics_survive_their_message_for_every_loss():
    for spec in losses.specs():
        for params in spec.test_params:
            predictions, targets = spec.make_inputs(3, 3, (4,), torch.Generator().manual_seed(0), torch.float32, dict(params))
            for group_ids in (None, [2, 0, 2]):
                stats = evaluation.statistics(spec.name, predictions, targets, group_ids=group_ids, **params)
                message = codec.statistics_message(stats)
                assert message.version == STATISTICS_VERSION
                assert [p.name for p in message.params] == sorted(stats.params)
                read = codec.read_statistics(pb.Statistics.FromString(message.SerializeToString()))
                assert read.settings() == stats.settings(), spec.name
                np.testing.assert_array_equal(read.totals, stats.totals)
                assert evaluation.evaluate(read).loss == evaluation.evaluate(stats).loss
                if group_ids is not None:
                    np.testing.assert_array_equal(read.group_ids, stats.group_ids)
                    np.testing.assert_array_equal(read.group_totals, stats.group_totals)


def _message():
    stats = evaluation.statistics("dice", torch.randn(3, 3, 4), torch.randint(0, 3, (3, 4)), group_ids=[1, 0, 1],
                                  mode="multiclass", batch=True, class_weight=[1.0, 2.0, 3.0])
    return codec.statistics_message(stats)


def _edit(function):
    message = _message()
    function(message)
    return message


@pytest.mark.parametrize("edit,field", [
    (lambda m: setattr(m, "version", 2), "statistics.version"),
    (lambda m: m.ClearField("loss"), "statistics.loss"),
    (lambda m: setattr(m.params[1], "name", m.params[0].name), "statistics.params[1].name"),
    (lambda m: m.params[0].tensor.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32)), "statistics.params[0]"),
    (lambda m: m.params.add(name="gamma"), f"statistics.params[{len(_message().params)}]"),
    (lambda m: setattr(m, "reduction", 42), "statistics.reduction"),
    (lambda m: m.layout.append("extra"), "statistics.totals.shape"),
    (lambda m: m.ClearField("totals"), "statistics.totals"),
    (lambda m: setattr(m.totals, "dtype", pb.DTYPE_FLOAT32), "statistics.totals.data"),
    (lambda m: setattr(m.totals, "data", np.full(9, np.nan).tobytes()), "statistics.totals"),
    (lambda m: setattr(m.group_ids, "data", np.array([1, 0], dtype=np.int64).tobytes()), "statistics.group_ids"),
    (lambda m: setattr(m.group_ids, "dtype", pb.DTYPE_INT32), "statistics.group_ids.data"),
    (lambda m: m.ClearField("group_totals"), "statistics.group_totals.dtype"),
    (lambda m: setattr(m, "num_batches", 0), "statistics.num_batches"),
])
def test_a_statistics_message_that_cannot_be_read_names_its_field(edit, field):
    with pytest.raises(codec.TensorError) as raised:
        codec.read_statistics(_edit(edit))
    assert raised.value.field == field, str(raised.value)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_any_statistics_message_reads_or_raises_a_field_error(data):
    r"""Mutated bytes of a valid message: either a readable message, read or refused naming a field
    (TensorError), or bytes protobuf refuses; whatever is read evaluates or raises ValueError."""
    body = bytearray(_message().SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] = data.draw(st.integers(0, 255))
    try:
        message = pb.Statistics.FromString(bytes(body))
    except Exception:  # noqa: BLE001 - protobuf's DecodeError: not a message at all
        return
    try:
        stats = codec.read_statistics(message)
    except codec.TensorError:
        return
    try:
        evaluation.evaluate(stats)
    except ValueError:
        pass


def test_statistics_compare_vectors_by_dtype_and_bytes():
    base = dict(loss="focal", reduction="mean", layout=("a",), totals=np.zeros(1))
    float32 = Statistics(params={"alpha": np.array([0.1, 0.2], dtype=np.float32)}, **base)
    float64 = Statistics(params={"alpha": np.array([0.1, 0.2], dtype=np.float64)}, **base)
    same = Statistics(params={"alpha": np.array([0.1, 0.2], dtype=np.float32)}, **base)
    assert float32.settings() == same.settings() and float32.settings() != float64.settings()
