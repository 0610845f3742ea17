r"""The gRPC LossService end to end against an in-process server on a free port.

One server per module (loading every backend takes seconds). It serves the session's export
(``tests/conftest.py``), or the folder of ``LOSS_SERVICE_TEST_ARTIFACTS`` as it is.
Small limits (1 MiB messages, 4096 elements) make the size checks cheap to exercise.
"""
import math

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loss_service import losses
from loss_service.client import LossClient, LossServiceError, build_request
from loss_service.server import SERVICE_NAME, BackgroundServer, ServerConfig
from loss_service.server import wire
from loss_service.codec import to_message
from loss_service.v1 import loss_service_pb2 as pb

MAX_MESSAGE_BYTES = 1 << 20
MAX_ELEMENTS = 4096
BACKENDS = ("eager", "torchscript", "onnx")
NUM_CLASSES = 3


@pytest.fixture(scope="module", autouse=True)
def zero_copy_everywhere():
    # Every request of this module, tiny ones included, is parsed the way large requests are
    # (payloads viewed in place, server.wire): the bad-input table below then covers that path.
    # The plain parse of small requests is covered by the subprocess tests (test_server_process).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "ZERO_COPY_MIN_BYTES", 0)
        yield


@pytest.fixture(scope="module")
def server(server_artifacts):
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), max_message_bytes=MAX_MESSAGE_BYTES,
                          max_elements=MAX_ELEMENTS, workers=2, export_missing=server_artifacts.export_missing)
    with BackgroundServer(config, address="127.0.0.1:0") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with LossClient(server.target, timeout=60, max_message_bytes=64 << 20) as connected:
        yield connected


def inputs(name, index=0, batch=4, spatial=(5,), seed=0, dtype=torch.float32):
    spec = losses.get(name)
    params = dict(spec.test_params[index])
    predictions, targets = spec.make_inputs(batch, NUM_CLASSES, spatial, torch.Generator().manual_seed(seed), dtype, params)
    return spec, params, predictions, targets


def sample_weights(batch, seed=1):
    return torch.rand(batch, generator=torch.Generator().manual_seed(seed)) + 0.1


def eager_value(name, params, predictions, targets, weights, reduction):
    return losses.build(name, **params, reduction=reduction)(predictions, targets, weights)


# -- ListLosses --------------------------------------------------------------------------------

def test_list_losses_describes_every_loss_with_every_backend(client):
    infos = {info.name: info for info in client.list_losses()}
    assert list(infos) == losses.names()
    for spec in losses.specs():
        info = infos[spec.name]
        assert info.summary == spec.summary and info.predictions == spec.predictions
        assert sorted(info.backends) == sorted(BACKENDS), f"{spec.name} is not offered on every backend: {info.backends}"
        params = {p.name: p for p in info.params}
        assert list(params) == spec.param_names()
        for param in spec.params:
            assert params[param.name].kind == param.kind
            assert params[param.name].range == param.range_text()
            assert params[param.name].doc == param.doc
        if "class_weight" in params:
            assert params["class_weight"].request_field == "class_weights"
        assert params["reduction"].request_field == "reduction"
        assert params["reduction"].default == "mean"


# -- parity: every loss through every backend against eager ----------------------------------------

def _send_params(params):
    r"""test_params as client keywords: class_weight/pos_weight have their own request fields."""
    kwargs = dict(params)
    if "class_weight" in kwargs:
        kwargs["class_weights"] = kwargs.pop("class_weight")
    return kwargs


PARITY_CASES = [
    pytest.param(spec.name, index, id=f"{spec.name}-{index}")
    for spec in losses.specs()
    for index in range(len(spec.test_params))
]


def parity_weights(spec, predictions, index):
    r"""Per-sample weights; for region losses, pixel weights on every other setting (their ONNX graphs
    take both kinds through separate inputs)."""
    if spec.pixel_weights and index % 2:
        return torch.rand(predictions.shape, generator=torch.Generator().manual_seed(2)) + 0.1
    return sample_weights(predictions.shape[0])


@pytest.mark.parametrize("name,index", PARITY_CASES)
def test_every_backend_matches_eager_pytorch(client, name, index):
    spec, params, predictions, targets = inputs(name, index)
    weights = parity_weights(spec, predictions, index)
    alone = {reduction: [float(eager_value(name, params, predictions[n:n + 1], targets[n:n + 1], weights[n:n + 1], reduction))
                         for n in range(predictions.shape[0])] for reduction in ("sum", "mean", "weighted_mean")}
    for reduction in ("mean", "sum", "weighted_mean", "none"):
        expected = eager_value(name, params, predictions, targets, weights, reduction)
        for backend in BACKENDS:
            result = client.score(name, predictions, targets, weights, reduction=reduction, backend=backend,
                                  return_per_sample=True, **_send_params(params))
            assert result.backend == backend and result.device == "cpu"
            what = f"{name} {params} {reduction} on {backend}"
            if reduction == "none":
                assert result.values is not None and result.values.shape == tuple(expected.shape), what
                np.testing.assert_allclose(result.values, expected.numpy(), rtol=1e-5, atol=1e-6, err_msg=what)
                assert math.isclose(result.loss, float(expected.double().sum()), rel_tol=1e-5, abs_tol=1e-5), what
            else:
                assert result.values is None
                assert math.isclose(result.loss, float(expected), rel_tol=1e-5, abs_tol=1e-6), (what, result.loss, float(expected))
            # per_sample[n] is the loss of sample n alone ("none": its sum).
            expected_alone = alone["sum" if reduction == "none" else reduction]
            np.testing.assert_allclose(result.per_sample, expected_alone, rtol=1e-5, atol=1e-6, err_msg=what)


def test_elementwise_summaries_match_the_statistics(client):
    spec, params, predictions, targets = inputs("bce_with_logits")
    weights = sample_weights(4)
    result = client.score("bce_with_logits", predictions, targets, weights)
    assert result.num_elements == predictions.numel()
    assert result.denominator == pytest.approx(predictions.numel())
    assert result.weight_sum == pytest.approx(float(weights.sum()) * predictions[0].numel(), rel=1e-6)


def test_float64_and_low_precision_inputs(client):
    _, _, predictions, targets = inputs("bce_with_logits", dtype=torch.float64)
    expected = eager_value("bce_with_logits", {}, predictions, targets, None, "mean")
    result = client.score("bce_with_logits", predictions, targets)
    assert result.loss == pytest.approx(float(expected), rel=1e-12)
    for dtype in (torch.float16, torch.bfloat16):
        low = predictions.to(dtype)
        values = client.score("bce_with_logits", low, targets.to(dtype), reduction="none").values
        expected = eager_value("bce_with_logits", {}, low, targets.to(dtype), None, "none")
        assert values.shape == tuple(expected.shape)
        np.testing.assert_allclose(values, expected.float().numpy(), rtol=1e-2, atol=1e-2)


def test_request_id_is_echoed_and_labels_accepted(client):
    _, _, predictions, targets = inputs("mse")
    result = client.score("mse", predictions, targets, request_id="abc-123", labels={"job": "eval"})
    assert result.request_id == "abc-123"


@pytest.mark.parametrize("name,index", PARITY_CASES)
def test_empty_batch_has_a_defined_result(client, name, index):
    r"""The eager module's result on every backend; the loss terms of a batch=True region loss (the index of
    empty sums: one per class, or one for generalized_dice), none for the others."""
    spec, params, predictions, targets = inputs(name, index, batch=0)
    forms = spec.forms_of(params)
    terms = 0 if forms.elementwise_totals else 1 if forms.values == "1" else predictions.shape[1]
    for backend in BACKENDS:
        what = (name, params, backend)
        for reduction in ("mean", "sum", "weighted_mean"):
            result = client.score(name, predictions, targets, reduction=reduction, backend=backend, **_send_params(params))
            assert result.loss == float(eager_value(name, params, predictions, targets, None, reduction)), what
            assert result.num_elements == terms, what
        none = client.score(name, predictions, targets, reduction="none", return_per_sample=True, backend=backend,
                            **_send_params(params))
        assert none.values.shape[0] == terms and none.per_sample.shape == (0,), what


# -- ScoreStream: the dataset value equals ScoreBatch on the concatenation --------------------------

STREAM_CASES = [pytest.param(name, reduction, id=f"{name}-{reduction}")
                for name in losses.names() for reduction in ("mean", "sum", "weighted_mean")]


@pytest.mark.parametrize("name,reduction", STREAM_CASES)
def test_stream_equals_batch_on_the_concatenation(client, name, reduction):
    spec = losses.get(name)
    index = len(spec.test_params) - 1
    # float64 inputs: the stream must equal the concatenation to float64 accuracy.
    _, params, predictions, targets = inputs(name, index, batch=6, seed=3, dtype=torch.float64)
    weights = sample_weights(6, seed=4).double()
    whole = client.score(name, predictions, targets, weights, reduction=reduction, **_send_params(params))
    bounds = [(0, 1), (1, 4), (4, 6)]  # uneven batch sizes
    batches = [(predictions[a:b], targets[a:b], weights[a:b]) for a, b in bounds]
    streamed = client.score_stream(batches, loss=name, reduction=reduction, **_send_params(params))
    assert streamed.num_batches == 3
    assert streamed.loss == pytest.approx(whole.loss, rel=1e-9, abs=1e-12)
    assert streamed.weight_sum == pytest.approx(whole.weight_sum, rel=1e-9)
    assert streamed.denominator == pytest.approx(whole.denominator, rel=1e-9)
    assert streamed.num_elements == whole.num_elements
    expected = float(eager_value(name, params, predictions, targets, weights, reduction))
    assert streamed.loss == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_on_every_backend_for_a_region_loss(client, backend):
    _, params, predictions, targets = inputs("dice", batch=5)
    batches = [(predictions[:2], targets[:2]), (predictions[2:], targets[2:])]
    whole = client.score("dice", predictions, targets, backend="eager")
    streamed = client.score_stream(batches, loss="dice", backend=backend)
    assert streamed.backend == backend
    assert streamed.loss == pytest.approx(whole.loss, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiclass_label_maps_with_a_channel_dimension_on_every_backend(client, backend):
    # (N, 1, H, W) integer label maps (MONAI's layout) mean the same as (N, H, W) class indices.
    generator = torch.Generator().manual_seed(5)
    predictions = torch.randn(3, 4, 5, 6, generator=generator)
    labels = torch.randint(0, 4, (3, 1, 5, 6), generator=generator)
    for name in ("dice", "tversky"):
        expected = eager_value(name, {"mode": "multiclass"}, predictions, labels, None, "mean")
        result = client.score(name, predictions, labels, backend=backend, mode="multiclass")
        assert result.backend == backend
        assert result.loss == pytest.approx(float(expected), rel=1e-5)
        assert result.loss == pytest.approx(client.score(name, predictions, labels[:, 0], backend=backend,
                                                         mode="multiclass").loss, rel=1e-6)
    out_of_range = labels.clone()
    out_of_range[0, 0, 0, 0] = 4
    with pytest.raises(LossServiceError) as error:
        client.score("dice", predictions, out_of_range, backend=backend, mode="multiclass")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.field_violations[0][0] == "targets"


def test_later_stream_batches_may_repeat_or_omit_settings_but_not_change_them(client):
    _, _, predictions, targets = inputs("focal", batch=4)
    first = {"predictions": predictions[:2], "targets": targets[:2]}
    same = {"predictions": predictions[2:], "targets": targets[2:], "loss": "focal", "gamma": 3.0}
    result = client.score_stream([first, same], loss="focal", gamma=3.0)
    expected = client.score("focal", predictions, targets, gamma=3.0)
    assert result.loss == pytest.approx(expected.loss, rel=1e-6)  # float32 inputs
    changed = dict(same, gamma=1.0)
    with pytest.raises(LossServiceError) as error:
        client.score_stream([first, changed], loss="focal", gamma=3.0)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.field_violations[0][0] == "batches[1].params"


def test_a_bad_batch_fails_the_stream_naming_its_index(client):
    _, _, predictions, targets = inputs("bce_with_logits", batch=6)
    bad = predictions[2:4].clone()
    bad[0, 0, 0] = float("nan")
    batches = [(predictions[:2], targets[:2]), (bad, targets[2:4]), (predictions[4:], targets[4:])]
    with pytest.raises(LossServiceError) as error:
        client.score_stream(batches, loss="bce_with_logits")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch 1" in error.value.details
    assert error.value.field_violations == [("batches[1].predictions", "must be finite, found NaN")]


def test_an_empty_stream_is_invalid(client):
    with pytest.raises(LossServiceError) as error:
        client.score_stream([], loss="mse")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


# -- bad input: every case a status code, a field violation and a message ---------------------------

def _valid(name="bce_with_logits"):
    _, _, predictions, targets = inputs(name)
    return build_request(name, predictions, targets, sample_weights(4))


def _with(name="bce_with_logits", **changes):
    def mutate():
        request = _valid(name)
        for field, value in changes.items():
            if isinstance(value, pb.Tensor):
                getattr(request, field).CopyFrom(value)
            elif field == "params":
                for key, param in value.items():
                    request.params[key].CopyFrom(param)
            else:
                setattr(request, field, value)
        return request
    return mutate


def _tensor(array):
    return to_message(np.asarray(array))


def _predictions(edit):
    def mutate():
        request = _valid()
        edit(request.predictions)
        return request
    return mutate


def _cross_entropy_targets(targets):
    def mutate():
        _, _, predictions, _ = inputs("cross_entropy")
        return build_request("cross_entropy", predictions, targets)
    return mutate


def _nonfinite_predictions(value, name="bce_with_logits"):
    def mutate():
        _, _, predictions, targets = inputs(name)
        predictions = predictions.clone()
        predictions[1, 2, 3] = value
        return build_request(name, predictions, targets)
    return mutate


def _bad_weights(value):
    def mutate():
        _, _, predictions, targets = inputs("bce_with_logits")
        weights = sample_weights(4)
        weights[2] = value
        return build_request("bce_with_logits", predictions, targets, weights)
    return mutate


def _set_shape(shape):
    def edit(tensor):
        tensor.shape[:] = shape
    return edit


def _truncate(tensor):
    tensor.data = tensor.data[:-4]


def _too_many_elements():
    predictions = torch.zeros(MAX_ELEMENTS + 1)
    return build_request("mse", predictions, predictions)


def _focal(**options):
    def make():
        _, _, predictions, targets = inputs("focal")
        return build_request("focal", predictions, targets, **options)
    return make


def _scalar_predictions():
    request = build_request("dice", np.float32(0.5), np.float32(1.0))
    assert list(request.predictions.shape) == [], "a 0-d array is sent as a 0-d tensor"
    return request


def _labels(labels):
    def make():
        request = _valid()
        request.labels.update(labels)
        return request
    return make


LONG_NAME = "y" * 20_000


BAD_INPUTS = [
    # id, request factory, status, field, text in the description
    ("unknown-loss", _with(loss="no_such_loss"), "INVALID_ARGUMENT", "loss", "bce_with_logits"),
    ("missing-loss", _with(loss=""), "INVALID_ARGUMENT", "loss", "must be set"),
    ("unknown-parameter", _with("focal", params={"gama": pb.Param(double_value=2.0)}), "INVALID_ARGUMENT",
     "params.gama", "valid parameters: gamma"),
    ("parameter-out-of-range", _with("focal", params={"gamma": pb.Param(double_value=-1.0)}), "INVALID_ARGUMENT",
     "params.gamma", "gamma"),
    ("parameter-wrong-kind", _with("focal", params={"gamma": pb.Param(string_value="two")}), "INVALID_ARGUMENT",
     "params.gamma", "is sent as double_value or int_value, got string_value"),
    ("parameter-not-integer", _with("cross_entropy", params={"ignore_index": pb.Param(double_value=1.5)}),
     "INVALID_ARGUMENT", "params.ignore_index", "integer"),
    ("reduction-as-param", _with(params={"reduction": pb.Param(string_value="sum")}), "INVALID_ARGUMENT",
     "params.reduction", "`reduction` field"),
    ("unknown-reduction", _with(reduction=42), "INVALID_ARGUMENT", "reduction", "REDUCTION_MEAN"),
    ("unknown-backend", _with(backend=42), "INVALID_ARGUMENT", "backend", "BACKEND_EAGER"),
    ("unspecified-dtype", _predictions(lambda t: setattr(t, "dtype", pb.DTYPE_UNSPECIFIED)), "INVALID_ARGUMENT",
     "predictions.dtype", "must be set"),
    ("unsupported-dtype", _predictions(lambda t: setattr(t, "dtype", 99)), "INVALID_ARGUMENT",
     "predictions.dtype", "unsupported dtype 99"),
    ("integer-predictions", _predictions(lambda t: setattr(t, "dtype", pb.DTYPE_INT32)), "INVALID_ARGUMENT",
     "predictions.dtype", "floating-point"),
    ("data-length", _predictions(_truncate), "INVALID_ARGUMENT", "predictions.data", "expected 240"),
    ("negative-dimension", _predictions(_set_shape([-4, 3, 5])), "INVALID_ARGUMENT", "predictions.shape", ">= 0"),
    ("shape-mismatch", _with(targets=_tensor(np.zeros((4, 3, 4), np.float32))), "INVALID_ARGUMENT", "targets",
     "shape of predictions"),
    ("weights-not-broadcastable", _with(weights=_tensor(np.ones((7, 2), np.float32))), "INVALID_ARGUMENT",
     "weights", "[7, 2]"),
    ("class-weights-wrong-length", _with(class_weights=_tensor(np.ones(5, np.float32))), "INVALID_ARGUMENT",
     "class_weights", "one entry per class"),
    ("negative-class-weights", _with(class_weights=_tensor(np.array([1.0, -1.0, 1.0], np.float32))),
     "INVALID_ARGUMENT", "class_weights", "[0, inf)"),
    ("class-weights-on-a-loss-without-them", _with("bce_dice", pos_weight=_tensor(np.ones(3, np.float32)),
                                                    class_weights=_tensor(np.ones(2, np.float32))),
     "INVALID_ARGUMENT", "class_weights", "one entry per class"),
    ("class-index-out-of-range", _cross_entropy_targets(np.full((4, 5), 7, np.int64)), "INVALID_ARGUMENT",
     "targets", "[0, 3)"),
    ("negative-class-index", _cross_entropy_targets(np.full((4, 5), -3, np.int64)), "INVALID_ARGUMENT",
     "targets", "ignore_index -100"),
    ("non-integer-class-targets", _cross_entropy_targets(np.full((4, 5), 1.0, np.float32)), "INVALID_ARGUMENT",
     "targets.dtype", "integers"),
    ("nan-predictions", _nonfinite_predictions(float("nan")), "INVALID_ARGUMENT", "predictions", "NaN"),
    ("inf-predictions", _nonfinite_predictions(float("inf")), "INVALID_ARGUMENT", "predictions", "Inf"),
    ("nan-weights", _bad_weights(float("nan")), "INVALID_ARGUMENT", "weights", "NaN"),
    ("inf-weights", _bad_weights(float("inf")), "INVALID_ARGUMENT", "weights", "Inf"),
    ("negative-weights", _bad_weights(-0.5), "INVALID_ARGUMENT", "weights", "must be >= 0"),
    ("bce-probabilities-outside-0-1", _nonfinite_predictions(1.5, "bce"), "INVALID_ARGUMENT", "predictions",
     "probabilities in [0, 1]"),
    ("missing-targets", lambda: pb.ScoreBatchRequest(loss="mse", predictions=_tensor(np.zeros(3, np.float32))),
     "INVALID_ARGUMENT", "targets", "must be set"),
    ("over-the-element-limit", _too_many_elements, "RESOURCE_EXHAUSTED", "predictions.shape", "limit of 4096"),
    ("a-zero-beside-a-huge-dimension", _predictions(_set_shape([0, 2 ** 62])), "RESOURCE_EXHAUSTED", "predictions.shape",
     "limit of 4096"),
    ("too-many-dimensions", _predictions(_set_shape([1] * 33)), "INVALID_ARGUMENT", "predictions.shape", "at most 32"),
    ("scalar-predictions", _scalar_predictions, "INVALID_ARGUMENT", "predictions.shape", "batch dimension"),
    ("2-d-class-weights", _with("cross_entropy", class_weights=_tensor(np.ones((3, 1), np.float32))),
     "INVALID_ARGUMENT", "class_weights", "1-D vector"),
    ("2-d-alpha", _focal(alpha=np.ones((3, 1), np.float32)), "INVALID_ARGUMENT", "tensor_params.alpha", "1-D vector"),
    ("gamma-beyond-float32", _with("focal", params={"gamma": pb.Param(double_value=1e308)}), "INVALID_ARGUMENT",
     "params.gamma", "finite in float32"),
    ("empty-class-weights", _with("cross_entropy", class_weights=_tensor(np.ones(0, np.float32))), "INVALID_ARGUMENT",
     "class_weights", "empty vector"),
    ("empty-pos-weight", _with(pos_weight=_tensor(np.ones(0, np.float32))), "INVALID_ARGUMENT", "pos_weight",
     "empty vector"),
    ("empty-alpha", _focal(alpha=np.ones(0, np.float32)), "INVALID_ARGUMENT", "tensor_params.alpha", "empty vector"),
    ("a-9-kb-loss-name", _with(loss="x" * 9000), "INVALID_ARGUMENT", "loss", "... (9000 characters)"),
    ("a-20-kb-parameter-name", _with("focal", params={LONG_NAME: pb.Param(double_value=1.0)}), "INVALID_ARGUMENT",
     f"params.{'y' * 64}... (20000 characters)", "unknown parameter"),
    ("too-many-labels", _labels({str(i): "x" for i in range(65)}), "INVALID_ARGUMENT", "labels", "at most 64"),
    ("a-long-label-value", _labels({"job": "v" * 300}), "INVALID_ARGUMENT", "labels[job]", "at most 256"),
    ("a-long-request-id", _with(request_id="r" * 300), "INVALID_ARGUMENT", "request_id", "at most 256"),
]


@pytest.mark.parametrize("make,code,field,text", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_field_violation(client, make, code, field, text):
    with pytest.raises(LossServiceError) as error:
        client.score_request(make())
    assert error.value.code.name == code
    assert error.value.field_violations, "no google.rpc.BadRequest field violations"
    fields = [f for f, _ in error.value.field_violations]
    assert fields == [field], error.value.field_violations
    assert text in error.value.field_violations[0][1], error.value.field_violations
    assert field in error.value.details and text in error.value.details
    # ... and the server answers the next valid request correctly.
    _, _, predictions, targets = inputs("bce_with_logits")
    weights = sample_weights(4)
    expected = eager_value("bce_with_logits", {}, predictions, targets, weights, "mean")
    assert client.score("bce_with_logits", predictions, targets, weights).loss == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_rejected_the_same_way_on_every_backend(client, backend):
    request = _cross_entropy_targets(np.full((4, 5), 7, np.int64))()
    request.backend = {"eager": pb.BACKEND_EAGER, "torchscript": pb.BACKEND_TORCHSCRIPT, "onnx": pb.BACKEND_ONNX}[backend]
    with pytest.raises(LossServiceError) as error:
        client.score_request(request)
    assert error.value.field_violations[0][0] == "targets"
    bad_shape = _with(targets=_tensor(np.zeros((4, 3, 4), np.float32)))()
    bad_shape.backend = request.backend
    with pytest.raises(LossServiceError) as error:
        client.score_request(bad_shape)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.field_violations[0][0] == "targets"
    # A 0-d dice on TorchScript once answered INTERNAL with the module's traceback.
    scalar = _scalar_predictions()
    scalar.backend = request.backend
    with pytest.raises(LossServiceError) as error:
        client.score_request(scalar)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.field_violations[0][0] == "predictions.shape"


def _raw_call(server, method, body, stream=False):
    with grpc.insecure_channel(server.target) as channel:
        path = f"/{SERVICE_NAME}/{method}"
        try:
            if stream:
                channel.stream_unary(path)(iter([body]), timeout=30)
            else:
                channel.unary_unary(path)(body, timeout=30)
        except grpc.RpcError as error:
            return error
    raise AssertionError("the call succeeded")


@pytest.mark.parametrize("method", ["ScoreBatch", "ScoreStream"])
@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05ab", _valid().SerializeToString()[:-3]],
                         ids=["garbage", "truncated-string", "truncated-request"])
def test_bytes_that_are_not_a_request_are_invalid_argument(server, client, method, body):
    error = _raw_call(server, method, body, stream=method == "ScoreStream")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid loss_service.v1.ScoreBatchRequest" in error.details()
    assert "DecodeError" not in error.details() and "<class" not in error.details()
    _, _, predictions, targets = inputs("mse")
    assert client.score("mse", predictions, targets).loss == pytest.approx(
        float(eager_value("mse", {}, predictions, targets, None, "mean")), rel=1e-6)


@pytest.mark.parametrize("where", ["loss", "params", "tensor_params", "labels"])
def test_statuses_stay_small_whatever_the_request_echoes(server, where):
    request = _valid("focal")
    name = "\u00e9" * 500_000  # 1 MB of UTF-8, 6 bytes each once percent-encoded
    if where == "loss":
        request.loss = name
    elif where == "params":
        request.params[name].double_value = 1.0
    elif where == "tensor_params":
        request.tensor_params[name].CopyFrom(_tensor(np.ones(3, np.float32)))
    else:
        request.labels[name] = "x"
    error = _raw_call(server, "ScoreBatch", request.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    size = len(error.details()) + sum(len(key) + len(value) for key, value in error.trailing_metadata())
    assert size < 4096, size
    assert "(500000 characters)" in error.details()


@pytest.mark.parametrize("name,mode", [("cross_entropy", None), ("dice", "multiclass"), ("bce_with_logits", None)])
def test_a_stream_whose_class_count_changes_is_rejected_naming_the_batch(client, name, mode):
    options = {"mode": mode} if mode else {}
    generator = torch.Generator().manual_seed(3)
    three, wider = (losses.get(name).make_inputs(2, classes, (5,), generator, torch.float32, dict(options))
                    for classes in (3, 4))
    with pytest.raises(LossServiceError) as error:
        client.score_stream([three, three, wider], loss=name, **options)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = error.value.field_violations
    assert field == "batches[2].predictions.shape"
    assert "4 classes along dim 1, batch 0 had 3 classes along dim 1" in description


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_region_masks_without_a_channel_on_every_backend(client, backend):
    # Binary region losses read (N, *) logits as one channel over every non-batch dimension.
    generator = torch.Generator().manual_seed(6)
    for shape in ((3, 5), (3, 2, 4, 4)):
        predictions = torch.randn(shape, generator=generator)
        masks = (torch.rand(shape, generator=generator) > 0.5).float()
        weights = torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=generator) + 0.5
        for name in ("dice", "iou", "tversky", "focal_tversky", "bce_dice"):
            for reduction in ("mean", "none"):
                expected = eager_value(name, {}, predictions, masks, weights, reduction)
                result = client.score(name, predictions, masks, weights, backend=backend, reduction=reduction)
                what = f"{name} {shape} {reduction} on {backend}"
                if reduction == "none":
                    np.testing.assert_allclose(result.values, expected.numpy(), rtol=1e-5, atol=1e-6, err_msg=what)
                else:
                    assert result.loss == pytest.approx(float(expected), rel=1e-5), what


def test_a_message_over_the_size_limit_is_resource_exhausted(client):
    predictions = np.zeros(MAX_MESSAGE_BYTES // 4 + 1, np.float32)  # > 1 MiB of predictions alone
    with pytest.raises(LossServiceError) as error:
        client.score("mse", predictions, predictions)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, _, p, t = inputs("mse")
    assert client.score("mse", p, t).loss == pytest.approx(float(eager_value("mse", {}, p, t, None, "mean")), rel=1e-6)


# -- health -----------------------------------------------------------------------------------------

def test_health_liveness_and_readiness(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
