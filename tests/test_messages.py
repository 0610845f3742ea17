r"""Messages for the common mistakes: a hint that says what to change, the same on every backend.

Library level: targets of the wrong shape that look like class indices get the hint of the loss's
kind (set ``mode="multiclass"``, use a multiclass loss, drop the class dimension), in eager and
scripted modules alike. Service level: each case is ``INVALID_ARGUMENT`` on ``targets`` with the
eager kernel's message on every backend; dense targets outside a region loss's range are refused on
every backend (the ONNX graphs check no values); no status names a torch dtype.
"""
import itertools
import re

import grpc
import numpy as np
import pytest
import torch

from loss_service import losses
from loss_service.client import LossClient, LossServiceError
from loss_service.losses._reduction import label_map_hint, multiclass_mode_hint, one_target_per_prediction_hint
from loss_service.codec import NUMPY_TO_WIRE
from loss_service.server import BackgroundServer, ServerConfig

BACKENDS = ("eager", "torchscript", "onnx")
BATCH, CLASSES, HEIGHT, WIDTH = 2, 3, 4, 5
LOGITS = torch.randn(BATCH, CLASSES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, CLASSES, (BATCH, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(1))

# (loss, params, predictions, targets, hint): targets that look like class indices where the
# setting needs one target per prediction, or class indices with a class dimension.
SHAPE_MISTAKES = [
    ("dice", {}, LOGITS, LABELS, multiclass_mode_hint()),
    ("iou", {"mode": "multilabel"}, LOGITS, LABELS[:, None], multiclass_mode_hint()),
    ("tversky", {}, LOGITS, LABELS[:, None].float(), multiclass_mode_hint()),
    ("bce_with_logits", {}, LOGITS, LABELS, one_target_per_prediction_hint()),
    ("binary_focal", {}, LOGITS, LABELS.float(), one_target_per_prediction_hint()),
    ("bce_dice", {}, LOGITS, LABELS, one_target_per_prediction_hint()),
    ("mse", {}, LOGITS, LABELS.float(), one_target_per_prediction_hint()),
    ("focal", {}, LOGITS, LABELS[:, None], label_map_hint()),
    ("cross_entropy", {}, LOGITS, LABELS[:, None], label_map_hint()),
    ("focal", {"class_dim": -1}, LOGITS.movedim(1, -1), LABELS[..., None], label_map_hint()),
]
SHAPE_MISTAKE_IDS = [f"{loss}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'defaults'}-{list(targets.shape)}"
                     for loss, params, _, targets, _ in SHAPE_MISTAKES]


# Mismatches that do not look like class indices: no hint.
OTHER_SHAPE_MISMATCHES = [
    ("mse", {}, torch.zeros(4), torch.zeros(5)),
    ("dice", {}, LOGITS[:, :1], torch.zeros(BATCH, 1, HEIGHT, WIDTH + 1)),
    ("focal", {}, LOGITS, torch.softmax(LOGITS, 1)[:, :2]),
]


def _library_message(loss, params, predictions, targets):
    module = losses.build(loss, **params)
    with pytest.raises(ValueError) as raised:
        module(predictions, targets)
    return str(raised.value)


@pytest.mark.parametrize("loss, params, predictions, targets, hint", SHAPE_MISTAKES, ids=SHAPE_MISTAKE_IDS)
def test_targets_that_look_like_class_indices_get_a_hint(loss, params, predictions, targets, hint):
    message = _library_message(loss, params, predictions, targets)
    assert message == (f"targets must have the shape of predictions: predictions {list(predictions.shape)} vs "
                       f"targets {list(targets.shape)}; {hint}")
    with pytest.raises(torch.jit.Error, match=re.escape(message)):
        torch.jit.script(losses.build(loss, **params))(predictions, targets)


@pytest.mark.parametrize("loss, params, predictions, targets", OTHER_SHAPE_MISMATCHES)
def test_other_shape_mismatches_get_no_hint(loss, params, predictions, targets):
    assert _library_message(loss, params, predictions, targets) == (
        f"targets must have the shape of predictions: predictions {list(predictions.shape)} vs "
        f"targets {list(targets.shape)}")


@pytest.fixture(scope="module")
def client(server_artifacts):
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), export_missing=server_artifacts.export_missing)
    with BackgroundServer(config, address="127.0.0.1:0") as server, LossClient(server.target, timeout=120) as connected:
        yield connected


def _refusal(client, loss, predictions, targets, backend, **options):
    with pytest.raises(LossServiceError) as refused:
        client.score(loss, predictions, targets, backend=backend, **options)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    return refused.value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss, params, predictions, targets",
                         [case[:4] for case in SHAPE_MISTAKES] + OTHER_SHAPE_MISMATCHES,
                         ids=SHAPE_MISTAKE_IDS + [f"{case[0]}-no-hint-{i}" for i, case in enumerate(OTHER_SHAPE_MISMATCHES)])
def test_every_backend_gives_the_kernels_message(client, backend, loss, params, predictions, targets):
    refused = _refusal(client, loss, predictions, targets, backend, **params)
    assert refused.field_violations == [("targets", _library_message(loss, params, predictions, targets))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss, params, targets", [
    ("dice", {}, torch.full((BATCH, CLASSES, HEIGHT, WIDTH), 2.0)),
    ("iou", {"mode": "multilabel"}, torch.full((BATCH, CLASSES, HEIGHT, WIDTH), -0.5)),
    ("tversky", {"mode": "multiclass"}, torch.softmax(LOGITS, 1) * 3),
    ("bce_dice", {"mode": "multilabel"}, torch.full((BATCH, CLASSES, HEIGHT, WIDTH), 1.5)),
], ids=["binary", "multilabel", "multiclass-probabilities", "bce_dice"])
def test_region_targets_outside_their_range_are_refused_on_every_backend(client, backend, loss, params, targets):
    with pytest.raises(ValueError, match=r"targets must be in \[0, 1\]"):
        losses.build(loss, **params)(LOGITS, targets)
    refused = _refusal(client, loss, LOGITS, targets, backend, **params)
    low, high = float(targets.min()), float(targets.max())
    assert refused.field_violations == [
        ("targets", f"loss '{loss}' takes targets in [0, 1] or equal its ignore_index -100, got values in [{low:g}, {high:g}]")
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_region_targets_equal_to_the_ignore_index_are_not_out_of_range(client, backend):
    masks = (torch.rand(BATCH, CLASSES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2)) > 0.5).to(torch.uint8)
    masks[:, :, 0] = 255
    expected = losses.build("dice", mode="multilabel", ignore_index=255)(LOGITS, masks)
    result = client.score("dice", LOGITS, masks, backend=backend, mode="multilabel", ignore_index=255)
    assert result.loss == pytest.approx(float(expected), rel=1e-5)


WIRE_NUMPY_DTYPES = sorted({np.dtype(dtype).name for dtype in NUMPY_TO_WIRE})


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_status_names_a_torch_dtype(client, backend):
    r"""Every loss, with each input and per-class vector sent in each wire dtype: the statuses say
    ``DTYPE_INT8``, never ``torch.int8`` (the library's word)."""
    generator = torch.Generator().manual_seed(3)
    statuses = set()
    for spec in losses.specs():
        predictions, targets = (t.numpy() for t in spec.make_inputs(BATCH, CLASSES, (WIDTH,), generator, torch.float32, {}))
        for field, dtype in itertools.product(("predictions", "targets", "weights", "class_weights"), WIRE_NUMPY_DTYPES):
            arrays = {"predictions": predictions, "targets": targets, "weights": None}
            options = {}
            if field in arrays:
                arrays[field] = (predictions if field == "predictions" else targets if field == "targets"
                                 else np.ones(BATCH)).astype(dtype)
            else:
                options[field] = np.ones(CLASSES).astype(dtype)
            try:
                client.score(spec.name, arrays["predictions"], arrays["targets"], arrays["weights"], backend=backend,
                             **options)
            except LossServiceError as error:
                statuses.add(error.code)
                assert "torch." not in error.details, (spec.name, field, dtype, error.details)
    assert statuses == {grpc.StatusCode.INVALID_ARGUMENT}
