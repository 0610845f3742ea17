r"""Regression-specific checks beyond the registry-generated suite in test_losses.py."""
import io

import pytest
import torch
import torch.nn.functional as F

from loss_service import losses
from loss_service.losses.regression import huber_loss, l1_loss, mse_loss, smooth_l1_loss

REDUCTIONS = ["none", "sum", "mean"]


def _pair(shape, seed=0, scale=2.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    predictions = torch.randn(shape, generator=generator, dtype=dtype) * scale
    targets = torch.randn(shape, generator=generator, dtype=dtype) * scale
    return predictions, targets


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smooth_l1_with_beta_zero_is_l1_in_value_and_gradient(reduction):
    predictions, targets = _pair((3, 2, 5))
    # Exact zeros of the residual: the point where a naive r²/β would give 0/0.
    targets[0, 0] = predictions[0, 0]
    ours_input = predictions.clone().requires_grad_(True)
    torch_input = predictions.clone().requires_grad_(True)
    ours = smooth_l1_loss(ours_input, targets, beta=0.0, reduction=reduction)
    expected = F.l1_loss(torch_input, targets, reduction=reduction)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, F.smooth_l1_loss(predictions, targets, beta=0.0, reduction=reduction))
    ours.sum().backward()
    expected.sum().backward()
    assert torch.isfinite(ours_input.grad).all()
    torch.testing.assert_close(ours_input.grad, torch_input.grad, rtol=1e-12, atol=1e-12)


def test_smooth_l1_beta_zero_at_zero_residual_is_finite_in_every_dtype():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        predictions = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
        result = smooth_l1_loss(predictions, torch.zeros(2, 3, dtype=dtype), beta=0.0, reduction="sum")
        assert float(result.detach()) == 0.0
        result.backward()
        assert torch.isfinite(predictions.grad).all(), dtype


@pytest.mark.parametrize("threshold", [1e-6, 0.3, 1.0, 7.0])
def test_huber_and_smooth_l1_match_torch_across_thresholds(threshold):
    predictions, targets = _pair((4, 3, 6), scale=3.0)
    torch.testing.assert_close(
        huber_loss(predictions, targets, delta=threshold, reduction="none"),
        F.huber_loss(predictions, targets, delta=threshold, reduction="none"),
        rtol=1e-12, atol=1e-12,
    )
    torch.testing.assert_close(
        smooth_l1_loss(predictions, targets, beta=threshold, reduction="none"),
        F.smooth_l1_loss(predictions, targets, beta=threshold, reduction="none"),
        rtol=1e-12, atol=1e-12,
    )


def test_huber_gradient_matches_torch_at_the_threshold():
    targets = torch.zeros(5, dtype=torch.float64)
    predictions = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    ours_input = predictions.clone().requires_grad_(True)
    torch_input = predictions.clone().requires_grad_(True)
    huber_loss(ours_input, targets, delta=1.0, reduction="sum").backward()
    F.huber_loss(torch_input, targets, delta=1.0, reduction="sum").backward()
    torch.testing.assert_close(ours_input.grad, torch_input.grad, rtol=0, atol=1e-15)


def test_large_residuals_give_finite_values_and_gradients_in_float32():
    predictions = torch.tensor([[1e30, -1e30, 3e37, 0.5]], requires_grad=True)
    targets = torch.tensor([[-1e30, 1e30, 0.0, 0.0]])
    for loss, kwargs, torch_loss in [
        (huber_loss, {"delta": 1.0}, lambda p, t, r: F.huber_loss(p, t, delta=1.0, reduction=r)),
        (smooth_l1_loss, {"beta": 0.5}, lambda p, t, r: F.smooth_l1_loss(p, t, beta=0.5, reduction=r)),
        (smooth_l1_loss, {"beta": 0.0}, lambda p, t, r: F.l1_loss(p, t, reduction=r)),
        (l1_loss, {}, lambda p, t, r: F.l1_loss(p, t, reduction=r)),
    ]:
        predictions.grad = None
        values = loss(predictions, targets, reduction="none", **kwargs)
        assert torch.isfinite(values).all(), loss.__name__
        torch.testing.assert_close(values, torch_loss(predictions, targets, "none"), rtol=1e-6, atol=0)
        loss(predictions, targets, reduction="mean", **kwargs).backward()
        assert torch.isfinite(predictions.grad).all(), loss.__name__


def test_mse_of_large_but_representable_squares_is_finite():
    predictions = torch.tensor([1e18, -1e18, 2.0], requires_grad=True)
    targets = torch.zeros(3)
    result = mse_loss(predictions, targets, reduction="mean")
    assert torch.isfinite(result)
    torch.testing.assert_close(result, F.mse_loss(predictions, targets), rtol=1e-6, atol=0)
    result.backward()
    assert torch.isfinite(predictions.grad).all()


@pytest.mark.parametrize("name", ["mse", "l1", "huber", "smooth_l1"])
def test_per_sample_weights_on_rank_4_inputs(name):
    predictions, targets = _pair((3, 2, 4, 3))
    # N = 3 equals the last dimension too: (N,) must still mean one weight per sample.
    weights = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    torch_loss = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss, "smooth_l1": F.smooth_l1_loss}[name]
    unweighted = torch_loss(predictions, targets, reduction="none")
    expected = unweighted * weights.reshape(3, 1, 1, 1)
    per_sample_count = float(predictions[0].numel())
    for reduction, value in [
        ("none", expected),
        ("sum", expected.sum()),
        ("mean", expected.sum() / predictions.numel()),
        ("weighted_mean", expected.sum() / (weights.sum() * per_sample_count)),
    ]:
        result = losses.build(name, reduction=reduction)(predictions, targets, weights)
        torch.testing.assert_close(result, value, rtol=1e-12, atol=1e-12, msg=f"{name} {reduction}")


def test_mean_counts_elements_and_weighted_mean_divides_by_the_weight_sum():
    predictions = torch.tensor([[1.0, 3.0], [0.0, -2.0]], dtype=torch.float64)
    targets = torch.zeros(2, 2, dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0], [2.0, 0.5]], dtype=torch.float64)
    # w·ℓ = [1·1, 0·9, 2·0, 0.5·4] = [1, 0, 0, 2]: sum 3, 4 elements, Σw = 3.5.
    assert float(mse_loss(predictions, targets, weights, reduction="sum")) == 3.0
    assert float(mse_loss(predictions, targets, weights, reduction="mean")) == 0.75
    assert float(mse_loss(predictions, targets, weights, reduction="weighted_mean")) == pytest.approx(3.0 / 3.5)


def test_class_weight_along_a_channels_last_dimension():
    predictions, targets = _pair((2, 4, 3))
    class_weight = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    result = losses.build("huber", delta=0.7, class_weight=class_weight, class_dim=-1, reduction="none")(predictions, targets)
    expected = F.huber_loss(predictions, targets, delta=0.7, reduction="none") * class_weight
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_predictions_without_a_class_dimension_take_a_single_class_weight():
    predictions, targets = _pair((5,))
    result = l1_loss(predictions, targets, class_weight=torch.tensor([2.0], dtype=torch.float64), reduction="sum")
    torch.testing.assert_close(result, 2.0 * F.l1_loss(predictions, targets, reduction="sum"))
    with pytest.raises(ValueError, match="class_weight"):
        l1_loss(predictions, targets, class_weight=torch.ones(3, dtype=torch.float64))


def test_huber_is_delta_times_smooth_l1():
    predictions, targets = _pair((3, 3, 4))
    torch.testing.assert_close(
        huber_loss(predictions, targets, delta=0.6, reduction="none"),
        0.6 * smooth_l1_loss(predictions, targets, beta=0.6, reduction="none"),
        rtol=1e-12, atol=1e-12,
    )


@pytest.mark.parametrize(
    "call,parameter",
    [
        (lambda p, t: huber_loss(p, t, delta=0.0), "delta"),
        (lambda p, t: huber_loss(p, t, delta=-1.0), "delta"),
        (lambda p, t: huber_loss(p, t, delta=float("nan")), "delta"),
        (lambda p, t: smooth_l1_loss(p, t, beta=-0.1), "beta"),
        (lambda p, t: smooth_l1_loss(p, t, beta=float("nan")), "beta"),
        (lambda p, t: losses.get("huber").statistics_kernel(
            p, t, None, delta=torch.tensor([1.0, 2.0]), class_weight=None, class_dim=1, per_sample=False), "delta"),
        (lambda p, t: losses.regression.HuberLoss(delta=0.0), "delta"),
        (lambda p, t: losses.regression.SmoothL1Loss(beta=-1.0), "beta"),
        (lambda p, t: mse_loss(p, t[:, :1]), r"predictions \[2, 3\] vs targets \[2, 1\]"),
        (lambda p, t: l1_loss(p.long(), t), "predictions must be a floating-point tensor"),
        (lambda p, t: mse_loss(p, t, reduction="mean_squared"), "reduction"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, parameter):
    predictions, targets = _pair((2, 3))
    with pytest.raises(ValueError, match=parameter):
        call(predictions, targets)


def test_scripted_module_reads_hyperparameters_at_call_time():
    predictions, targets = _pair((2, 3, 4))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(losses.build("smooth_l1", beta=1.0, reduction="sum")), buffer)
    buffer.seek(0)
    scripted = torch.jit.load(buffer)
    scripted.beta = 0.0
    torch.testing.assert_close(scripted(predictions, targets), F.l1_loss(predictions, targets, reduction="sum"))
    scripted.beta = 0.25
    torch.testing.assert_close(
        scripted(predictions, targets), F.smooth_l1_loss(predictions, targets, beta=0.25, reduction="sum")
    )


def test_half_precision_keeps_delta_in_float32():
    # δ = 1e-8 underflows to 0 in float16; the float16 result must be the float32 computation with
    # δ = 1e-8 (6e-4 for r = 60000, representable), not a loss with δ = 0.
    assert float(torch.tensor(1e-8).half()) == 0.0
    predictions = torch.tensor([60000.0, 0.5], dtype=torch.float16)
    targets = torch.zeros(2, dtype=torch.float16)
    result = huber_loss(predictions, targets, delta=1e-8, reduction="none")
    expected = F.huber_loss(predictions.float(), targets.float(), delta=1e-8, reduction="none").half()
    assert float(expected[0]) > 0
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
