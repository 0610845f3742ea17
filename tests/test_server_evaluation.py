r"""Per-group and per-class results and mergeable statistics through the gRPC service, on every backend.

A group's loss must equal ScoreBatch on that group alone, a stream's groups the batch's, and the client's
merge of shards' statistics ScoreBatch on everything; bad group_ids and statistics get client statuses
naming their field. The library's own tests (tests/test_evaluation.py) cover every reduction and weight
form against the loss modules in float64.
"""
import grpc
import numpy as np
import pytest
import torch

from loss_service import codec, evaluation, losses
from loss_service.client import LossServiceError, build_request
from loss_service.protocol import SERVICE_NAME
from loss_service.statistics import MAX_GROUPS
from loss_service.v1 import loss_service_pb2 as pb
from tests.test_server import (  # noqa: F401 - fixtures
    BACKENDS, MAX_ELEMENTS, PARITY_CASES, _send_params, client, inputs, parity_weights, server,
)

REDUCTIONS = ("mean", "sum", "weighted_mean", "none")
GROUP_IDS = np.array([3, -1, 3, 9, -1, 3])
SHARDS = [(0, 1), (1, 4), (4, 6)]


def close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=what)


def parity_case(name, index, seed):
    r"""``(params, predictions, targets, weights, reduction, options)`` of a parity case: a batch of
    ``len(GROUP_IDS)`` samples, its weights, a reduction by the case's index and the client's options."""
    spec, params, predictions, targets = inputs(name, index, batch=len(GROUP_IDS), seed=seed)
    reduction = REDUCTIONS[index % len(REDUCTIONS)]
    options = dict(reduction=reduction, **_send_params(params))
    return params, predictions, targets, parity_weights(spec, predictions, index), reduction, options


@pytest.mark.parametrize("name,index", PARITY_CASES)
def test_groups_and_merged_shards_on_every_backend(client, name, index):
    params, predictions, targets, weights, reduction, options = parity_case(name, index, seed=5)
    for backend in BACKENDS:
        what = f"{name} {params} {reduction} on {backend}"
        whole = client.score(name, predictions, targets, weights, group_ids=GROUP_IDS, return_statistics=True,
                             backend=backend, **options)
        assert list(whole.group_ids) == [-1, 3, 9], what
        alone = []
        for label in whole.group_ids:
            rows = torch.from_numpy(GROUP_IDS == label)
            alone.append(client.score(name, predictions[rows], targets[rows], weights[rows], backend=backend,
                                      **dict(options, reduction="sum" if reduction == "none" else reduction)).loss)
        close(whole.group_losses, alone, what)
        # The statistics are the library's: the same layout and settings on every backend.
        library = evaluation.statistics(name, predictions, targets, weights, group_ids=GROUP_IDS, reduction=reduction, **params)
        assert whole.statistics.settings() == library.settings(), what
        close(whole.statistics.totals, library.totals, what)
        parts = [
            client.score(name, predictions[a:b], targets[a:b], weights[a:b], group_ids=GROUP_IDS[a:b],
                         return_statistics=True, backend=backend, **options).statistics
            for a, b in SHARDS
        ]
        merged = client.merge(parts)
        expected = whole.loss if reduction != "none" else client.score(
            name, predictions, targets, weights, backend=backend, **dict(options, reduction="sum")).loss
        close(merged.loss, expected, what)
        close(merged.group_losses, whole.group_losses, what)
        assert merged.num_batches == len(SHARDS) and merged.statistics.num_batches == len(SHARDS)
        assert (merged.num_elements, merged.weight_sum) == pytest.approx((whole.num_elements, whole.weight_sum), rel=1e-6)


@pytest.mark.parametrize("name,params", [("focal", {}), ("dice", {"mode": "multiclass", "batch": True}),
                                         ("bce_dice", {"mode": "multilabel", "batch": True})])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_with_groups_equals_the_batch_with_groups(client, name, params, backend):
    spec = losses.get(name)
    predictions, targets = spec.make_inputs(len(GROUP_IDS), 3, (5,), torch.Generator().manual_seed(2), torch.float32, params)
    whole = client.score(name, predictions, targets, group_ids=GROUP_IDS, backend=backend, **params)
    batches = [{"predictions": predictions[a:b], "targets": targets[a:b], "group_ids": GROUP_IDS[a:b]} for a, b in SHARDS]
    streamed = client.score_stream(batches, loss=name, backend=backend, return_statistics=True, **params)
    assert streamed.backend == backend
    close(streamed.loss, whole.loss, name)
    np.testing.assert_array_equal(streamed.group_ids, whole.group_ids)
    close(streamed.group_losses, whole.group_losses, name)
    # A stream's statistics merge with a batch's: here, the same data twice gives the same mean.
    twice = client.merge([streamed.statistics, client.score(
        name, predictions, targets, group_ids=GROUP_IDS, backend=backend, return_statistics=True, **params).statistics])
    assert twice.num_batches == len(SHARDS) + 1
    close(twice.group_losses, whole.group_losses, name)


def test_statistics_without_groups_and_a_stream_without_them(client):
    _, _, predictions, targets = inputs("cross_entropy", batch=4)
    batch = client.score("cross_entropy", predictions, targets)
    assert batch.statistics is None and batch.group_ids is None and batch.group_losses is None
    with_statistics = client.score("cross_entropy", predictions, targets, return_statistics=True)
    assert with_statistics.statistics.layout == ("loss_sum", "weight_sum", "denominator", "count")
    assert with_statistics.group_ids is None and with_statistics.statistics.group_ids is None
    streamed = client.score_stream([(predictions[:2], targets[:2]), (predictions[2:], targets[2:])], loss="cross_entropy")
    assert streamed.statistics is None and streamed.group_ids is None
    merged = client.merge([with_statistics.statistics])
    assert merged.loss == pytest.approx(batch.loss, rel=1e-9) and merged.backend == "eager"


def _refused(call):
    with pytest.raises(LossServiceError) as error:
        call()
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, error.value.details
    return error.value.field_violations[0]


@pytest.mark.parametrize("group_ids,text", [
    (np.array([0.0, 1.0, 0.0, 1.0]), "must be integer labels"),
    (np.array([True, False, True, False]), "must be integer labels"),
    (np.array([0, 1]), "one label per sample, shape (4,), got [2]"),
    (np.array([[0, 1, 0, 1]]), "one label per sample, shape (4,), got [1, 4]"),
])
def test_bad_group_ids_are_invalid_argument(client, group_ids, text):
    _, _, predictions, targets = inputs("focal", batch=4)
    field, description = _refused(lambda: client.score("focal", predictions, targets, group_ids=group_ids))
    assert field == "group_ids" and text in description, description


def test_a_stream_sends_group_ids_with_every_batch_or_with_none(client):
    _, _, predictions, targets = inputs("focal", batch=4)
    grouped = {"predictions": predictions[:2], "targets": targets[:2], "group_ids": np.array([0, 1])}
    plain = {"predictions": predictions[2:], "targets": targets[2:]}
    for batches, batch_without in (([grouped, plain], "had"), ([plain, grouped], "had none")):
        field, description = _refused(lambda: client.score_stream(batches, loss="focal"))
        assert field == "batches[1].group_ids" and description.endswith(f"batch 0 {batch_without}"), description


def test_a_stream_over_the_group_bound_is_refused_naming_the_batch(client):
    per_batch = MAX_ELEMENTS
    batches_needed = MAX_GROUPS // per_batch + 1
    zeros = np.zeros(per_batch, np.float32)
    batches = [{"predictions": zeros, "targets": zeros, "group_ids": np.arange(per_batch) + index * per_batch}
               for index in range(batches_needed)]
    field, description = _refused(lambda: client.score_stream(batches, loss="mse"))
    assert field == f"batches[{batches_needed - 1}].group_ids" and f"at most {MAX_GROUPS}" in description


def _statistics(name="focal", **params):
    spec = losses.get(name)
    predictions, targets = spec.make_inputs(4, 3, (5,), torch.Generator().manual_seed(0), torch.float32, params)
    return evaluation.statistics(name, predictions, targets, **params)


def _merge_raw(client, messages):
    return client._call(client._stub.MergeStatistics, pb.MergeStatisticsRequest(statistics=messages), 30)


def test_merge_refuses_statistics_of_other_settings_naming_the_item(client):
    with pytest.raises(ValueError, match=r"statistics\[1\]: cannot be merged with statistics\[0\]: parameter 'gamma'"):
        client.merge([_statistics(), _statistics(gamma=3.0)])  # refused by the client, before any call
    # The server checks too, whatever a client sends.
    messages = [codec.statistics_message(_statistics()), codec.statistics_message(_statistics("cross_entropy"))]
    field, description = _refused(lambda: _merge_raw(client, messages))
    assert field == "statistics[1]" and "loss 'cross_entropy' vs 'focal'" in description


def test_merge_refuses_statistics_it_cannot_read(client):
    message = codec.statistics_message(_statistics())

    def edited(**fields):
        copy = pb.Statistics()
        copy.CopyFrom(message)
        for name, value in fields.items():
            setattr(copy, name, value)
        return copy

    assert _refused(lambda: _merge_raw(client, []))[0] == "statistics"
    assert _refused(lambda: _merge_raw(client, [edited(version=7)]))[0] == "statistics[0].version"
    assert _refused(lambda: _merge_raw(client, [message, edited(version=7)]))[0] == "statistics[1].version"
    field, description = _refused(lambda: _merge_raw(client, [edited(loss="no\nsuch")]))
    assert field == "statistics[0].loss" and "unknown loss 'no\\nsuch'" in description
    wrong_layout = edited()
    wrong_layout.layout[0] = "sum"
    field, description = _refused(lambda: _merge_raw(client, [wrong_layout]))
    assert field == "statistics[0]" and "layout" in description
    unknown = edited()
    unknown.params.add(name="gam\nma" + "x" * 100, value=pb.Param(double_value=1.0))
    field, description = _refused(lambda: _merge_raw(client, [unknown]))
    assert field == "statistics[0].params" and "unknown parameter 'gam\\nma" in description and "characters)" in description
    bad_text = codec.statistics_message(_statistics("dice", mode="multiclass"))
    next(p for p in bad_text.params if p.name == "mode").value.string_value = "multi\nclass"
    field, description = _refused(lambda: _merge_raw(client, [bad_text]))
    assert field == "statistics[0].params" and "got 'multi\\nclass'" in description
    bad_param = edited()
    next(p for p in bad_param.params if p.name == "gamma").value.double_value = -1.0
    field, description = _refused(lambda: _merge_raw(client, [bad_param]))
    assert field == "statistics[0]" and "gamma" in description
    with pytest.raises(grpc.RpcError) as raised:
        client._channel.unary_unary(f"/{SERVICE_NAME}/MergeStatistics")(b"\xff\xff", timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_merge_refuses_sums_the_response_cannot_hold(client):
    r"""Hostile statistics whose sums overflow: batches past int64, totals past float64, a count past int64."""
    message = codec.statistics_message(_statistics())
    many = pb.Statistics()
    many.CopyFrom(message)
    many.num_batches = 2**62
    field, description = _refused(lambda: _merge_raw(client, [many, many]))
    assert field == "statistics" and "batches in all" in description
    huge = pb.Statistics()
    huge.CopyFrom(message)
    huge.totals.data = np.full(4, 1.5e308).tobytes()
    field, description = _refused(lambda: _merge_raw(client, [huge, huge]))
    assert field == "statistics" and "overflow float64" in description
    counted = pb.Statistics()
    counted.CopyFrom(message)
    counted.totals.data = np.array([1.0, 1.0, 1.0, 1e300]).tobytes()
    field, description = _refused(lambda: _merge_raw(client, [counted]))
    assert field == "statistics[0].totals" and "int64" in description


def test_a_request_for_statistics_builds_its_message(client):
    request = build_request("mse", np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32), group_ids=[4, 4],
                            return_statistics=True)
    assert request.return_statistics and list(codec.to_numpy(request.group_ids)) == [4, 4]
    result = client.score_request(request)
    assert list(result.group_ids) == [4] and result.group_losses.tolist() == [1.0]


@pytest.mark.parametrize("name,index", PARITY_CASES)
def test_per_class_results_on_every_backend_are_the_librarys(client, name, index):
    params, predictions, targets, weights, reduction, options = parity_case(name, index, seed=6)
    library = evaluation.score(name, predictions, targets, weights, group_ids=GROUP_IDS, per_class=True,
                               reduction=reduction, **params)
    for backend in BACKENDS:
        what = f"{name} {params} {reduction} on {backend}"
        whole = client.score(name, predictions, targets, weights, group_ids=GROUP_IDS, return_per_class=True,
                             return_statistics=True, backend=backend, **options)
        close(whole.class_losses, library.class_losses, what)
        assert (whole.class_scores is None) == (library.class_scores is None), what
        if library.class_scores is not None:
            close(whole.class_scores, library.class_scores, what)
        assert whole.statistics.class_layout == library.statistics.class_layout, what
        close(whole.statistics.class_totals, library.statistics.class_totals, what)
        close(whole.group_losses, library.group_losses, what)
        parts = [
            client.score(name, predictions[a:b], targets[a:b], weights[a:b], return_per_class=True,
                         return_statistics=True, backend=backend, **options).statistics
            for a, b in SHARDS
        ]
        merged = client.merge(parts)
        close(merged.class_losses, library.class_losses, what)
        batches = [{"predictions": predictions[a:b], "targets": targets[a:b], "weights": weights[a:b]} for a, b in SHARDS]
        streamed = client.score_stream(batches, loss=name, backend=backend, return_per_class=True, **options)
        close(streamed.class_losses, library.class_losses, what)
        if library.class_scores is not None:
            close(streamed.class_scores, library.class_scores, what)


def test_per_class_results_come_only_when_asked(client):
    _, _, predictions, targets = inputs("cross_entropy", batch=4)
    plain = client.score("cross_entropy", predictions, targets)
    assert plain.class_losses is None and plain.class_scores is None
    per_class = client.score("cross_entropy", predictions, targets, return_per_class=True)
    assert per_class.class_losses.shape == (predictions.shape[1],) and per_class.class_scores is None
    assert per_class.loss == plain.loss and per_class.statistics is None


def test_merge_refuses_class_totals_that_do_not_fit_the_loss(client):
    message = codec.statistics_message(evaluation.statistics(
        "dice", torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4)), per_class=True, mode="multiclass", batch=True))

    def edited(edit):
        copy = pb.Statistics()
        copy.CopyFrom(message)
        edit(copy)
        return copy

    def other_layout(copy):
        copy.class_layout[0] = "loss_sum"

    def no_totals(copy):
        copy.ClearField("class_totals")

    def other_classes(copy):
        copy.class_totals.CopyFrom(codec.to_message(np.ones((2, 3))))

    def flat(copy):
        copy.class_totals.CopyFrom(codec.to_message(np.ones(9)))

    field, description = _refused(lambda: _merge_raw(client, [edited(other_layout)]))
    assert field == "statistics[0]" and "class layout" in description
    field, description = _refused(lambda: _merge_raw(client, [edited(no_totals)]))
    assert field == "statistics[0].class_totals" and "must be set" in description
    field, description = _refused(lambda: _merge_raw(client, [edited(other_classes)]))
    assert field == "statistics[0]" and "2 classes, the totals 3" in description
    field, description = _refused(lambda: _merge_raw(client, [edited(flat)]))
    assert field == "statistics[0].class_totals.shape" and "(C, 3)" in description
    field, description = _refused(lambda: _merge_raw(client, [message, codec.statistics_message(evaluation.statistics(
        "dice", torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4)), mode="multiclass", batch=True))]))
    assert field == "statistics[1]" and "per class" in description
