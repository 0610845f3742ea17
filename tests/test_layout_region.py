r"""Region losses in the canonical ONNX layout: per-sample weights, pixel weights and none.

Region losses give ``(N,)`` weights a per-sample meaning (they weight a sample's overlap), which
no pixel weight expresses; their graphs take a separate ``sample_weights`` input. These tests
check the kernels' two weight arguments against the modules' one, the layout's feeds, and
exported graphs against eager PyTorch in ONNX Runtime (every mode, ``batch`` True and False,
multiclass class indices and probabilities).
"""
import numpy as np
import pytest
import torch

from loss_service import layout, losses
from loss_service.losses import REDUCTIONS

REGION_LOSSES = [spec.name for spec in losses.specs() if spec.pixel_weights]


def _inputs(name, params, batch=3, classes=3, spatial=(4, 5), seed=0, dtype=torch.float64):
    spec = losses.get(name)
    generator = torch.Generator().manual_seed(seed)
    return spec.make_inputs(batch, classes, spatial, generator, dtype, params)


def _weights(predictions, seed=1):
    generator = torch.Generator().manual_seed(seed)
    per_sample = torch.rand(predictions.shape[0], generator=generator, dtype=predictions.dtype) + 0.1
    pixel = torch.rand(predictions.shape, generator=generator, dtype=predictions.dtype)
    return per_sample, pixel


# ------------------------------------------------------------------ the two-weight kernels


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("name", REGION_LOSSES)
def test_the_kernel_with_two_weight_arguments_reproduces_the_module(name, batch):
    spec = losses.get(name)
    mode = "multilabel"
    params = {"mode": mode, "batch": batch, "ignore_index": 255}
    predictions, targets = _inputs(name, params)
    per_sample, pixel = _weights(predictions)
    module = losses.build(name, **params)
    ones_pixel = torch.ones_like(predictions)
    ones_sample = torch.ones(predictions.shape[0], dtype=predictions.dtype)
    for weights, split in ((None, (ones_pixel, ones_sample)), (per_sample, (ones_pixel, per_sample)),
                           (pixel, (pixel, ones_sample))):
        expected = module.statistics(predictions, targets, weights, True)
        actual = _call_kernel(spec, module, predictions, targets, *split)
        for got, want in zip(actual, expected):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


def _call_kernel(spec, module, predictions, targets, weights, sample_weights):
    r"""``spec.statistics_kernel`` with ``module``'s hyperparameters and the loss's constants in the
    kernels' argument form."""
    arguments = {
        name: None if value is None else torch.tensor(value, dtype=torch.float64)
        for name, value in spec.constants.items()
    }
    for param in spec.params:
        if param.name == "reduction":
            continue
        value = getattr(module, param.name)
        if param.kind == "float":
            value = torch.tensor(value, dtype=torch.float64)
        elif param.kind == "bool" and param.graph_input:
            value = torch.tensor(value)
        elif param.kind == "str" and param.graph_input:
            value = torch.tensor(param.choices.index(value))
        elif param.kind == "int":
            value = torch.tensor(value, dtype=torch.int64)
        elif param.kind == "vector":
            value = value if value.numel() else None
        arguments[param.name] = value
    return spec.statistics_kernel(predictions, targets, weights, sample_weights, per_sample=True, **arguments)


@pytest.mark.parametrize("batch", [False, True])
def test_both_weight_kinds_compose(batch):
    r"""Pixel weights act inside the sums, sample weights on the sample: with ``batch=False`` the
    sample weight multiplies the pixel-weighted losses; with ``batch=True`` it equals a pixel
    weight constant over the sample."""
    params = {"mode": "multiclass", "batch": batch}
    predictions, targets = _inputs("dice", params)
    per_sample, pixel = _weights(predictions)
    module = losses.build("dice", **params)
    values, totals, _ = _call_kernel(losses.get("dice"), module, predictions, targets, pixel, per_sample)
    if batch:
        folded = pixel * per_sample.reshape(-1, 1, 1, 1)
        expected_values, expected_totals, _ = module.statistics(predictions, targets, folded, True)
    else:
        # Totals [Σ w·ℓ, Σ w, Σ d, n] of the (N, C) losses with w = s_n (no class weights).
        pixel_values, _, _ = module.statistics(predictions, targets, pixel, True)
        expected_values = pixel_values * per_sample.unsqueeze(1)
        count = float(pixel_values.numel())
        expected_totals = torch.stack([
            expected_values.sum(), per_sample.sum() * pixel_values.shape[1],
            torch.tensor(count, dtype=torch.float64), torch.tensor(count, dtype=torch.float64),
        ])
    torch.testing.assert_close(values, expected_values, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(totals, expected_totals, rtol=1e-12, atol=1e-14)


def test_bad_sample_weights_raise_value_errors_naming_them():
    spec = losses.get("dice")
    predictions, targets = _inputs("dice", {"mode": "multilabel"})
    module = losses.build("dice", mode="multilabel")
    with pytest.raises(ValueError, match=r"sample_weights must have shape \(N,\) = \[3\].*got \[4\]"):
        _call_kernel(spec, module, predictions, targets, None, torch.ones(4))
    with pytest.raises(ValueError, match=r"weights \(pixel weights\) of shape \[3, 2\] must broadcast"):
        _call_kernel(spec, module, predictions, targets, torch.ones(3, 2), None)


# -------------------------------------------------------------------------- layout feeds


def test_region_graph_inputs_have_sample_weights_after_weights():
    for name in REGION_LOSSES:
        spec = losses.get(name)
        assert layout.has_sample_weights_input(spec), name
        names = layout.onnx_input_names(spec)
        assert names[:4] == ["predictions", "targets", "weights", "sample_weights"]
        assert names[-1] == "reduction"
    for spec in losses.specs():
        if not spec.pixel_weights:
            assert "sample_weights" not in layout.onnx_input_names(spec), spec.name


@pytest.mark.parametrize("kind", ["none", "per_sample", "pixel"])
def test_to_canonical_routes_region_weights(kind):
    spec = losses.get("tversky")
    params = {"mode": "multilabel"}
    predictions, targets = _inputs("tversky", params, dtype=torch.float32)
    per_sample, pixel = _weights(predictions)
    weights = {"none": None, "per_sample": per_sample, "pixel": pixel}[kind]
    feeds, _ = layout.to_canonical(spec, params, predictions, targets, weights)
    assert list(feeds) == layout.onnx_input_names(spec)
    assert feeds["weights"].shape == (3, 3, 20) and feeds["weights"].dtype == np.float32
    assert feeds["sample_weights"].shape == (3,) and feeds["sample_weights"].dtype == np.float32
    expected_sample = per_sample.numpy() if kind == "per_sample" else np.ones(3, np.float32)
    expected_pixel = pixel.reshape(3, 3, 20).numpy() if kind == "pixel" else np.ones((3, 3, 20), np.float32)
    np.testing.assert_array_equal(feeds["sample_weights"], expected_sample)
    np.testing.assert_array_equal(feeds["weights"], expected_pixel)


def test_to_canonical_one_dimensional_binary_predictions_take_n_weights_as_pixels():
    # (N,) predictions: every sample is one pixel and the kernels read (N,) weights as pixel weights.
    spec = losses.get("dice")
    predictions = torch.randn(5)
    targets = (torch.rand(5) < 0.5).float()
    weights = torch.rand(5)
    feeds, _ = layout.to_canonical(spec, {}, predictions, targets, weights)
    np.testing.assert_array_equal(feeds["weights"].reshape(5), weights.numpy())
    np.testing.assert_array_equal(feeds["sample_weights"], np.ones(5, np.float32))


def test_to_canonical_keeps_other_losses_weights_unchanged():
    spec = losses.get("cross_entropy")
    predictions = torch.randn(3, 4, 5)
    targets = torch.randint(0, 4, (3, 5))
    feeds, _ = layout.to_canonical(spec, {}, predictions, targets, torch.tensor([1.0, 2.0, 3.0]))
    assert list(feeds) == layout.onnx_input_names(spec) and "sample_weights" not in feeds
    np.testing.assert_array_equal(feeds["weights"], np.repeat([[1.0], [2.0], [3.0]], 5, axis=1).astype(np.float32))


# --------------------------------------------------------------- multiclass probabilities


def _soft_targets(shape, seed=4):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.softmax(logits, dim=1)


@pytest.mark.parametrize("batch", [False, True])
def test_multiclass_probability_targets_match_monai(batch):
    from monai.losses import DiceLoss as MonaiDiceLoss

    predictions, _ = _inputs("dice", {"mode": "multiclass"}, classes=4)
    soft = _soft_targets(predictions.shape)
    ours = losses.build("dice", mode="multiclass", batch=batch, include_background=False)(predictions, soft)
    monai = MonaiDiceLoss(softmax=True, batch=batch, include_background=False)(predictions, soft)
    torch.testing.assert_close(ours, monai, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in REGION_LOSSES if "multiclass" in losses.get(n).param("mode").choices])
def test_multiclass_one_hot_probabilities_equal_class_indices(name):
    params = {"mode": "multiclass", "ignore_index": 255, "reduction": "none"}
    predictions, indices = _inputs(name, params)
    module = losses.build(name, **params)
    ignored = indices == 255
    one_hot = torch.nn.functional.one_hot(torch.where(ignored, 0, indices), 3).movedim(-1, 1).double()
    # An ignored position: ignore_index in one channel drops it from every class.
    marked = torch.where(ignored.unsqueeze(1) & (torch.arange(3).reshape(1, 3, 1, 1) == 1),
                         torch.full_like(one_hot, 255.0), one_hot)
    torch.testing.assert_close(module(predictions, marked), module(predictions, indices), rtol=1e-13, atol=1e-15)


def test_multiclass_probability_targets_errors_and_scripting():
    predictions, _ = _inputs("dice", {"mode": "multiclass"})
    soft = _soft_targets(predictions.shape)
    module = losses.build("dice", mode="multiclass")
    with pytest.raises(ValueError, match=r"multiclass probability targets must be in \[0, 1\]"):
        module(predictions, soft * 2)
    with pytest.raises(ValueError, match="integer class indices"):
        module(predictions, soft[:, 0])
    scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(predictions, soft), module(predictions, soft), rtol=1e-13, atol=1e-15)


# ------------------------------------------------------------------ exported ONNX graphs

# Every mode, batch False and True, class indices and probabilities; a few ~5 s exports.
EXPORTED = [
    ("dice", {"mode": "multiclass"}),
    ("focal_tversky", {"mode": "multiclass", "batch": True, "targets": "probabilities"}),
    ("tversky", {"mode": "multilabel"}),
    ("iou", {"mode": "multilabel", "batch": True}),
    ("bce_dice", {"batch": True}),
    ("dice", {}),
]


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    import onnxruntime

    from loss_service.export.artifacts import export_onnx

    out = tmp_path_factory.mktemp("region_onnx")
    found = {}
    for name, variant in EXPORTED:
        spec = losses.get(name)
        path = out / layout.onnx_file_name(spec, variant)
        export_onnx(spec, variant, path)
        found[path.name] = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return found


def _settings(name, variant):
    r"""The variant's settings, plus non-default hyperparameters (ignore_index, class weights, …)."""
    spec = losses.get(name)
    base = layout.variant_params(spec, variant)
    extra = {"ignore_index": 255, "smooth_nr": 0.5, "smooth_dr": 1.0, "include_background": False,
             "class_weight": torch.tensor([0.5, 2.0, 1.0]) if base.get("mode", "binary") != "binary" else None}
    if name == "tversky":
        extra.update(alpha=0.3, beta=0.9)
    if name == "focal_tversky":
        extra.update(gamma=1.5, log_loss=True)
    if name == "bce_dice":
        extra.update(pos_weight=torch.tensor([2.0]), dice_weight=0.5)
    return [base, dict(base, **{k: v for k, v in extra.items() if v is not None})]


def _close(actual, expected, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected.detach().double().numpy() if isinstance(expected, torch.Tensor) else expected)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * scale, err_msg=what)


@pytest.mark.parametrize("name,variant", EXPORTED, ids=[n + "-" + layout.variant_key(v) for n, v in EXPORTED])
def test_onnx_graph_matches_eager_for_every_weight_kind(sessions, name, variant):
    spec = losses.get(name)
    session = sessions[layout.onnx_file_name(spec, variant)]
    assert [i.name for i in session.get_inputs()] == layout.onnx_input_names(spec)
    assert session.get_inputs()[3].shape == ["N"]
    for settings in _settings(name, variant):
        # Sizes unlike the traced example (2 x 4 x 6): N = 3, C = 3, S = 4 x 5.
        predictions, targets = layout.example_inputs(
            spec, variant, 3, 3, (4, 5), torch.Generator().manual_seed(11), torch.float32, settings
        )
        per_sample, pixel = _weights(predictions)
        for label, weights in (("none", None), ("per-sample", per_sample), ("pixel", pixel)):
            params = {k: v for k, v in settings.items()}
            assert layout.request_variant(spec, params, predictions.shape, targets.shape) == variant
            feeds, restore = layout.to_canonical(spec, params, predictions, targets, weights)
            module = losses.build(name, **params)
            values, totals, sample_totals = module.statistics(predictions, targets, weights, True)
            class_totals = module.statistics(predictions, targets, weights, False, False, True)[2]
            what = f"{name} {settings} {label}"
            for reduction in REDUCTIONS:
                feeds["reduction"] = np.asarray(layout.REDUCTION_CODES[reduction], dtype=np.int64)
                loss, graph_values, graph_totals, graph_samples, graph_classes = session.run(layout.ONNX_OUTPUTS, feeds)
                expected = losses.build(name, **params, reduction=reduction)(predictions, targets, weights)
                if reduction == "none":
                    _close(restore(graph_values), expected, what + " values")
                    _close(loss, module.reductions(totals)[0], what + " loss none")
                else:
                    _close(loss, expected, f"{what} loss {reduction}")
            _close(graph_totals, totals, what + " totals")
            _close(graph_samples, sample_totals, what + " sample_totals")
            _close(graph_classes, class_totals, what + " class_totals")
            _close(restore(graph_values), values, what + " statistics values")
