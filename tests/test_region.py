r"""Region losses (dice, iou, tversky, focal_tversky) and bce_dice against independent anchors.

The registry-generated suite (test_losses.py) checks every setting against tests/references; here
the losses meet outside anchors: the blog DiceLoss formula, MONAI's DiceLoss and TverskyLoss, the
identities between the indices, and the edge cases the documentation promises.
"""
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import TverskyLoss as MonaiTverskyLoss

from loss_service import losses
from loss_service.losses import MONAI_WEIGHT_TYPES

SEED = 0


def logits_and_masks(shape, seed=SEED, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, dtype=dtype) * 2
    masks = (torch.rand(shape, generator=generator, dtype=dtype) < 0.3).to(dtype)
    return logits, masks


def logits_and_indices(batch, classes, spatial, seed=SEED):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, classes) + spatial, generator=generator, dtype=torch.float64) * 2
    indices = torch.randint(0, classes, (batch,) + spatial, generator=generator)
    return logits, indices


def test_blog_dice_loss_anchor():
    # The widely copied DiceLoss: sigmoid, flatten the whole batch, one index with smooth s.
    logits, masks = logits_and_masks((4, 1, 6, 7))
    smooth = 1.0
    p, t = torch.sigmoid(logits).view(-1), masks.view(-1)
    expected = 1 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    module = losses.build("dice", batch=True, smooth_nr=smooth, smooth_dr=smooth)
    torch.testing.assert_close(module(logits, masks), expected, rtol=1e-12, atol=1e-12)


MONAI_CASES = [
    # (mode, our params, MONAI kwargs)
    ("binary", {}, {}),
    ("binary", {"batch": True, "smooth_nr": 0.0, "smooth_dr": 1e-3}, {"batch": True, "smooth_nr": 0.0, "smooth_dr": 1e-3}),
    ("multilabel", {"squared_pred": True}, {"squared_pred": True}),
    ("multilabel", {"include_background": False, "batch": True}, {"include_background": False, "batch": True}),
    ("multiclass", {}, {}),
    ("multiclass", {"include_background": False, "smooth_nr": 1.0, "smooth_dr": 1.0},
     {"include_background": False, "smooth_nr": 1.0, "smooth_dr": 1.0}),
    ("multiclass", {"batch": True, "squared_pred": True}, {"batch": True, "squared_pred": True}),
    ("multiclass", {"class_weight": [0.5, 2.0, 1.0, 3.0]}, {"weight": [0.5, 2.0, 1.0, 3.0]}),
    ("multiclass", {"class_weight": [9.0, 2.0, 1.0, 3.0], "include_background": False},
     {"weight": [2.0, 1.0, 3.0], "include_background": False}),
    ("multilabel", {"class_weight": [1.0, 0.25, 4.0, 1.0], "batch": True}, {"weight": [1.0, 0.25, 4.0, 1.0], "batch": True}),
]


def _monai_inputs(mode, soft=False):
    if mode == "multiclass":
        logits, indices = logits_and_indices(3, 4, (5, 6))
        return logits, indices, indices.unsqueeze(1), {"softmax": True, "to_onehot_y": True}
    channels = 1 if mode == "binary" else 4
    logits, masks = logits_and_masks((3, channels, 5, 6))
    if soft:
        masks = torch.rand(masks.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return logits, masks, masks, {"sigmoid": True}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode,params,monai_kwargs", MONAI_CASES)
def test_dice_matches_monai(mode, params, monai_kwargs, reduction):
    logits, targets, monai_targets, activation = _monai_inputs(mode)
    if mode == "multiclass" and params.get("squared_pred"):
        # MONAI's to_onehot_y makes float32 targets and its squared_pred squares float32 norms
        # (sqrt(37)**2 != 37 there): give it exact float64 one-hot targets instead.
        monai_targets = F.one_hot(targets, logits.shape[1]).movedim(-1, 1).double()
        activation = {"softmax": True}
    params = {k: (torch.tensor(v) if k == "class_weight" else v) for k, v in params.items()}
    ours = losses.build("dice", mode=mode, reduction=reduction, **params)(logits, targets)
    monai = MonaiDiceLoss(reduction=reduction, **activation, **monai_kwargs)(logits, monai_targets)
    if reduction == "none":
        monai = monai.reshape(monai.shape[:2]) if not params.get("batch") else monai.reshape(-1)
        if not params.get("include_background", True):
            # Dropped background: we keep its column, as a 0 (shape independent of the setting).
            torch.testing.assert_close(ours[..., 0], torch.zeros_like(ours[..., 0]), rtol=0, atol=0)
            ours = ours[..., 1:]
    torch.testing.assert_close(ours, monai, rtol=1e-10, atol=1e-12)


def test_dice_matches_monai_with_soft_targets_and_gradients():
    logits, targets, _, _ = _monai_inputs("multilabel", soft=True)
    ours_input = logits.clone().requires_grad_(True)
    monai_input = logits.clone().requires_grad_(True)
    ours = losses.build("dice", mode="multilabel")(ours_input, targets)
    monai = MonaiDiceLoss(sigmoid=True)(monai_input, targets)
    torch.testing.assert_close(ours, monai, rtol=1e-10, atol=1e-12)
    ours.backward()
    monai.backward()
    torch.testing.assert_close(ours_input.grad, monai_input.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batch", [False, True])
def test_dice_ignore_index_matches_monai(batch):
    logits, indices = logits_and_indices(3, 4, (5, 6))
    indices[:, :2, :3] = 255
    ours = losses.build("dice", mode="multiclass", ignore_index=255, batch=batch)(logits, indices)
    monai = MonaiDiceLoss(softmax=True, to_onehot_y=True, ignore_index=255, batch=batch)(logits, indices.unsqueeze(1))
    torch.testing.assert_close(ours, monai, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.3, 0.7), (0.8, 0.1)])
def test_tversky_matches_monai(alpha, beta, batch):
    logits, targets, monai_targets, activation = _monai_inputs("multiclass")
    ours = losses.build("tversky", mode="multiclass", alpha=alpha, beta=beta, batch=batch)(logits, targets)
    monai = MonaiTverskyLoss(alpha=alpha, beta=beta, batch=batch, **activation)(logits, monai_targets)
    torch.testing.assert_close(ours, monai, rtol=1e-10, atol=1e-12)


def _loss_and_grad(name, logits, targets, **params):
    x = logits.clone().requires_grad_(True)
    value = losses.build(name, **params)(x, targets)
    value.sum().backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("reduction", ["none", "mean", "weighted_mean"])
@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("batch", [False, True])
def test_tversky_identities_without_smoothing(mode, batch, reduction):
    if mode == "multiclass":
        logits, targets = logits_and_indices(3, 3, (4, 5))
    else:
        logits, targets = logits_and_masks((3, 1 if mode == "binary" else 3, 4, 5))
    common = dict(mode=mode, batch=batch, reduction=reduction, smooth_nr=0.0, smooth_dr=0.0)
    for alpha_beta, other in ((0.5, "dice"), (1.0, "iou")):
        value, grad = _loss_and_grad("tversky", logits, targets, alpha=alpha_beta, beta=alpha_beta, **common)
        expected, expected_grad = _loss_and_grad(other, logits, targets, **common)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("batch", [False, True])
def test_focal_tversky_gamma_one_is_tversky(batch):
    logits, targets = logits_and_indices(3, 3, (4, 5))
    params = dict(mode="multiclass", batch=batch, alpha=0.3, beta=0.7, reduction="none")
    value, grad = _loss_and_grad("focal_tversky", logits, targets, gamma=1.0, **params)
    expected, expected_grad = _loss_and_grad("tversky", logits, targets, **params)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_focal_tversky_applies_the_exponent_per_class():
    logits, targets = logits_and_indices(2, 3, (4, 5))
    tversky = losses.build("tversky", mode="multiclass", alpha=0.3, beta=0.7, reduction="none")(logits, targets)
    focal = losses.build("focal_tversky", mode="multiclass", gamma=0.75, reduction="none")(logits, targets)
    torch.testing.assert_close(focal, tversky ** 0.75, rtol=1e-12, atol=1e-14)


def test_iou_formula():
    logits, masks = logits_and_masks((2, 3, 4, 5))
    smooth = 0.5
    p = torch.sigmoid(logits)
    intersection = (p * masks).sum((2, 3))
    union = p.sum((2, 3)) + masks.sum((2, 3)) - intersection
    expected = 1 - (intersection + smooth) / (union + smooth)
    module = losses.build("iou", mode="multilabel", smooth_nr=smooth, smooth_dr=smooth, reduction="none")
    torch.testing.assert_close(module(logits, masks), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "weighted_mean"])
def test_bce_dice_defaults_are_bce_with_logits_plus_dice(reduction):
    logits, masks = logits_and_masks((3, 1, 4, 5))
    weights = torch.rand(3, dtype=torch.float64) + 0.1
    combined = losses.build("bce_dice", reduction=reduction)(logits, masks, weights)
    if reduction == "none":
        expected = torch.stack(
            [
                losses.build("bce_with_logits")(logits[i:i + 1], masks[i:i + 1], weights[i:i + 1])
                + losses.build("dice")(logits[i:i + 1], masks[i:i + 1], weights[i:i + 1])
                for i in range(3)
            ]
        )
    else:
        expected = losses.build("bce_with_logits", reduction=reduction)(logits, masks, weights) + losses.build(
            "dice", reduction=reduction
        )(logits, masks, weights)
    torch.testing.assert_close(combined, expected, rtol=1e-12, atol=1e-14)


def test_bce_dice_defaults_come_from_the_bce_and_dice_specs():
    combo, dice, bce = losses.get("bce_dice"), losses.get("dice"), losses.get("bce_with_logits")
    for param in combo.params:
        source = dice if param.name in dice.param_names() else bce if param.name in bce.param_names() else None
        if source is not None:
            assert param.default == source.param(param.name).default, param.name
    assert combo.param("mode").choices == ("binary", "multilabel")


def test_bce_dice_weights_scale_each_term():
    logits, masks = logits_and_masks((3, 2, 4, 5))
    params = dict(mode="multilabel", reduction="sum")
    combined = losses.build("bce_dice", bce_weight=0.25, dice_weight=3.0, **params)(logits, masks)
    bce = losses.build("bce_with_logits", reduction="sum")(logits, masks)
    dice = losses.build("dice", **params)(logits, masks)
    torch.testing.assert_close(combined, 0.25 * bce + 3.0 * dice, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dice", "iou", "tversky", "focal_tversky", "bce_dice"])
@pytest.mark.parametrize("batch", [False, True])
def test_ignored_positions_are_exactly_dropped(name, batch):
    # Binary masks with 255 on a border: the loss equals the loss on the kept positions alone.
    logits, masks = logits_and_masks((2, 1, 4, 6))
    marked = masks.clone()
    marked[..., 4:] = 255
    value = losses.build(name, ignore_index=255, batch=batch)(logits, marked)
    expected = losses.build(name, batch=batch)(logits[..., :4].contiguous(), masks[..., :4].contiguous())
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)


def test_ignored_target_with_multiclass_index_beyond_classes():
    logits, indices = logits_and_indices(2, 3, (4, 6))
    marked = indices.clone()
    marked[..., 4:] = 255
    value = losses.build("dice", mode="multiclass", ignore_index=255, reduction="none")(logits, marked)
    # A pixel's softmax sums over every class, so dropping it means dropping all its channels.
    expected = losses.build("dice", mode="multiclass", reduction="none")(
        logits[..., :4].contiguous(), indices[..., :4].contiguous()
    )
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)


def test_empty_class_predicted_empty_has_zero_loss_with_smoothing():
    # Class 2 absent from the target and predicted absent (logit -1e4): index (0 + s)/(0 + s) = 1.
    logits, indices = logits_and_indices(2, 3, (4, 5))
    indices = indices.clamp(max=1)
    logits[:, 2] = -1e4
    values = losses.build("dice", mode="multiclass", reduction="none")(logits, indices)
    torch.testing.assert_close(values[:, 2], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["dice", "iou", "tversky", "focal_tversky"])
@pytest.mark.parametrize("batch", [False, True])
def test_zero_over_zero_without_smoothing_is_index_one(name, batch):
    logits = torch.full((2, 1, 3, 3), -1e4, dtype=torch.float32, requires_grad=True)
    masks = torch.zeros((2, 1, 3, 3))
    value = losses.build(name, smooth_nr=0.0, smooth_dr=0.0, batch=batch, reduction="none")(logits, masks)
    assert torch.equal(value, torch.zeros_like(value))
    value.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # and with log_loss: -log(1) = 0
    log_value = losses.build(name, smooth_nr=0.0, smooth_dr=0.0, batch=batch, log_loss=True)(logits, masks)
    assert float(log_value.detach()) == 0.0


def test_empty_target_with_predictions_is_a_full_loss():
    logits = torch.full((1, 1, 2, 2), 10.0, dtype=torch.float64)
    masks = torch.zeros((1, 1, 2, 2), dtype=torch.float64)
    value = losses.build("dice", smooth_nr=0.0, smooth_dr=0.0)(logits, masks)
    torch.testing.assert_close(value, torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("name", ["dice", "iou", "tversky", "focal_tversky", "bce_dice"])
def test_class_weight_of_wrong_length_raises(name):
    logits, masks = logits_and_masks((2, 3, 4))
    module = losses.build(name, mode="multilabel", class_weight=torch.ones(2))
    with pytest.raises(ValueError, match="class_weight"):
        module(logits, masks)
    with pytest.raises(ValueError, match="class_weight"):
        losses.build(name, class_weight=torch.tensor([-1.0]))


@pytest.mark.parametrize("name", ["dice", "iou", "tversky", "focal_tversky", "bce_dice"])
@pytest.mark.parametrize("batch", [False, True])
def test_binary_shapes_with_and_without_channel_agree(name, batch):
    logits, masks = logits_and_masks((3, 1, 4, 5))
    weights = torch.rand(3, 1, 4, 5, dtype=torch.float64)
    module = losses.build(name, batch=batch, reduction="sum")
    torch.testing.assert_close(
        module(logits, masks, weights), module(logits[:, 0], masks[:, 0], weights[:, 0]), rtol=1e-12, atol=1e-14
    )


def test_multiclass_index_targets_with_channel_dimension():
    logits, indices = logits_and_indices(3, 4, (5, 6))
    module = losses.build("dice", mode="multiclass", reduction="none")
    torch.testing.assert_close(module(logits, indices.unsqueeze(1)), module(logits, indices), rtol=0, atol=0)


def test_bad_targets_raise_value_errors():
    logits, indices = logits_and_indices(2, 3, (4,))
    with pytest.raises(ValueError, match=r"multiclass targets must be in \[0, 3\)"):
        losses.build("dice", mode="multiclass")(logits, torch.full_like(indices, 3))
    with pytest.raises(ValueError, match="integer class indices"):
        losses.build("dice", mode="multiclass")(logits, indices.double())
    with pytest.raises(ValueError, match=r"predictions \[2, 3, 4\] vs targets \[2, 4, 4\]"):
        losses.build("dice", mode="multiclass")(logits, torch.zeros(2, 4, 4, dtype=torch.long))
    masks = torch.full((2, 3, 4), 2.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 1\]"):
        losses.build("iou", mode="multilabel")(logits, masks)
    with pytest.raises(ValueError, match="mode"):
        losses.build("bce_dice", mode="multiclass")


def _stream_case(name, mode, batch):
    params = dict(mode=mode, batch=batch, include_background=False, ignore_index=255)
    if name == "tversky":
        params.update(alpha=0.3, beta=0.9)
    generator = torch.Generator().manual_seed(7)
    spec = losses.get(name)
    first = spec.make_inputs(3, 3, (4, 5), generator, torch.float64, params)
    second = spec.make_inputs(2, 3, (4, 5), generator, torch.float64, params)
    return params, first, second


@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize(
    "name,mode", [("dice", "multiclass"), ("tversky", "multilabel"), ("focal_tversky", "binary"), ("bce_dice", "multilabel")]
)
def test_stream_totals_are_exact(name, mode, batch, reduction):
    params, (p1, t1), (p2, t2) = _stream_case(name, mode, batch)
    w1 = torch.rand(p1.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w2 = torch.rand(p2.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    module = losses.build(name, reduction=reduction, **params)
    _, totals1, _ = module.statistics(p1, t1, w1)
    _, totals2, _ = module.statistics(p2, t2, w2)
    column = ["sum", "mean", "weighted_mean"].index(reduction)
    streamed = module.reductions(totals1 + totals2)[column]
    whole = module(torch.cat([p1, p2]), torch.cat([t1, t2]), torch.cat([w1, w2]))
    torch.testing.assert_close(streamed, whole, rtol=1e-12, atol=1e-14)


def test_batch_totals_layout_is_per_class_sums():
    logits, indices = logits_and_indices(2, 3, (4, 5))
    _, totals, sample_totals = losses.build("dice", mode="multiclass", batch=True).statistics(logits, indices, None, True)
    p = torch.softmax(logits, 1)
    onehot = F.one_hot(indices, 3).permute(0, 3, 1, 2).double()
    expected = torch.cat([(p * onehot).sum((0, 2, 3)), p.sum((0, 2, 3)), onehot.sum((0, 2, 3))])
    torch.testing.assert_close(totals, expected, rtol=1e-12, atol=1e-12)
    assert sample_totals.shape == (2, 9)


def test_scripted_module_reads_hyperparameters_at_call_time():
    logits, indices = logits_and_indices(2, 3, (4, 5))
    scripted = torch.jit.script(losses.build("focal_tversky", mode="multiclass"))
    scripted.gamma = 2.0
    scripted.include_background = False
    expected = losses.build("focal_tversky", mode="multiclass", gamma=2.0, include_background=False)(logits, indices)
    torch.testing.assert_close(scripted(logits, indices), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode, ignore", [("multiclass", False), ("multiclass", True), ("binary", False),
                                          ("multilabel", True)])
@pytest.mark.parametrize("squared_pred", [False, True])
def test_eager_sums_equal_the_traced_form(monkeypatch, mode, ignore, squared_pred):
    r"""The eager class-index sums (gather and scatter_add, no one-hot) and the dense sums without a mask
    when nothing is ignored give the traced form's values and gradients, with per-class pixel weights."""
    from loss_service.losses import _reduction, region

    spec = losses.get("dice")
    params = {"mode": mode, "squared_pred": squared_pred, "batch": False}
    if ignore:
        params["ignore_index"] = 255
    predictions, targets = spec.make_inputs(3, 3, (4, 5), torch.Generator().manual_seed(1), torch.float64, params)
    pixel_weights = torch.rand(predictions.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for traced in (False, True):
        # The kernels' and the hyperparameters' (0-d tensors while tracing) view of tracing.
        monkeypatch.setattr(region, "is_tracing", lambda: traced)
        monkeypatch.setattr(_reduction, "is_tracing", lambda: traced)
        leaf = predictions.clone().requires_grad_(True)
        values = losses.build("dice", **params, reduction="none")(leaf, targets, pixel_weights)
        results.append((values, torch.autograd.grad(values.sum(), leaf)[0]))
    for eager, traced in zip(*results):
        torch.testing.assert_close(eager, traced, rtol=1e-12, atol=1e-14)


# -- generalized_dice: MONAI's GeneralizedDiceLoss -------------------------------------------------

# MONAI's fixed-number cases (tests/losses/test_generalized_dice_loss.py) that map onto logits: sigmoid
# (binary, or multilabel of its one-hot targets) and softmax with to_onehot_y (multiclass). The others
# feed probabilities without an activation, or tanh / log_softmax.
MONAI_GENERALIZED_DICE_CASES = [
    ("binary", {"smooth_nr": 1e-6, "smooth_dr": 1e-6}, [[[[1.0, -1.0], [-1.0, 1.0]]]], [[[[1.0, 0.0], [1.0, 1.0]]]],
     0.307576),
    ("binary", {"smooth_nr": 1e-4, "smooth_dr": 1e-4}, [[[[1.0, -1.0], [-1.0, 1.0]]], [[[1.0, -1.0], [-1.0, 1.0]]]],
     [[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 0.0], [1.0, 0.0]]]], 0.416597),
    ("multilabel", {"smooth_nr": 1e-4, "smooth_dr": 1e-4}, [[[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]], [[0.0] * 3, [0.0] * 3]],
     [[[1, 0, 0]], [[1, 1, 0]]], 0.469964),
    ("multiclass", {"smooth_nr": 1e-4, "smooth_dr": 1e-4}, [[[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]], [[0.0] * 3, [0.0] * 3]],
     [[[1, 0, 0]], [[1, 1, 0]]], 0.414507),
    ("multiclass", {"smooth_nr": 1e-4, "smooth_dr": 1e-4, "reduction": "sum"},
     [[[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]], [[0.0] * 3, [0.0] * 3]], [[[1, 0, 0]], [[1, 1, 0]]], 0.829015),
    ("multiclass", {"smooth_nr": 1e-4, "smooth_dr": 1e-4, "reduction": "none"},
     [[[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]], [[0.0] * 3, [0.0] * 3]], [[[1, 0, 0]], [[1, 1, 0]]], [0.273476, 0.555539]),
    ("multiclass", {"weight_exponent": 1.0, "smooth_nr": 0.0, "smooth_dr": 0.0},  # w_type="simple"
     [[[0.0, 10.0, 10.0, 10.0], [10.0, 0.0, 0.0, 0.0]]], [[[1, 1, 0, 0]]], 0.250023),
]


@pytest.mark.parametrize("mode,params,logits,targets,expected", MONAI_GENERALIZED_DICE_CASES)
def test_generalized_dice_matches_monai_test_numbers(mode, params, logits, targets, expected):
    logits = torch.tensor(logits)
    targets = torch.tensor(targets)
    if mode == "multilabel":  # MONAI's to_onehot_y with sigmoid: one-hot masks, one channel per class
        targets = F.one_hot(targets[:, 0], logits.shape[1]).movedim(-1, 1).float()
    result = losses.build("generalized_dice", mode=mode, **params)(logits, targets)
    torch.testing.assert_close(result, torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:single channel prediction")  # MONAI's note on include_background, binary
@pytest.mark.parametrize("weight_type", list(MONAI_WEIGHT_TYPES))
@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_generalized_dice_matches_monai_with_gradients(weight_type, mode, batch, include_background):
    from monai.losses import GeneralizedDiceLoss as MonaiGeneralizedDiceLoss

    if mode == "multiclass":
        logits, targets = logits_and_indices(3, 4, (5, 6))
        targets[0][targets[0] == 2] = 1  # a class absent from a sample: its weight is replaced
        monai_targets = F.one_hot(targets, 4).movedim(-1, 1).double()
        activation = {"softmax": True}
    else:
        logits, targets = logits_and_masks((3, 1 if mode == "binary" else 4, 5, 6))
        targets[1] = 0.0  # a sample without any positive
        monai_targets, activation = targets, {"sigmoid": True}
    for reduction in ("mean", "sum"):
        ours_input = logits.clone().requires_grad_(True)
        monai_input = logits.clone().requires_grad_(True)
        ours = losses.build("generalized_dice", weight_exponent=MONAI_WEIGHT_TYPES[weight_type], mode=mode, batch=batch,
                            include_background=include_background, reduction=reduction)(ours_input, targets)
        monai = MonaiGeneralizedDiceLoss(w_type=weight_type, batch=batch, include_background=include_background,
                                         reduction=reduction, **activation)(monai_input, monai_targets)
        # MONAI takes the class weights from float32 target sums.
        torch.testing.assert_close(ours, monai, rtol=1e-6, atol=1e-9)
        ours.backward()
        monai.backward()
        torch.testing.assert_close(ours_input.grad, monai_input.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("eps", [1e-8, 0.0, 0.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_generalized_dice_with_uniform_weights_is_kornias_micro_dice(eps, weighted):
    r"""kornia's dice_loss(average="micro"): one Dice per sample over all classes and pixels, eps in the
    denominator only, ignored pixels out of both sums, class weights scaling each class's terms."""
    from kornia.losses import dice_loss

    logits, targets = logits_and_indices(3, 4, (5, 6))
    targets[0, 0, :3] = -100
    class_weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64) if weighted else None
    ours_input = logits.clone().requires_grad_(True)
    kornia_input = logits.clone().requires_grad_(True)
    ours = losses.build("generalized_dice", mode="multiclass", weight_exponent=0.0, smooth_nr=0.0, smooth_dr=eps,
                        class_weight=class_weight)(ours_input, targets)
    kornia = dice_loss(kornia_input, targets, average="micro", eps=eps, weight=class_weight)
    torch.testing.assert_close(ours, kornia, rtol=1e-10, atol=1e-12)
    ours.backward()
    kornia.backward()
    torch.testing.assert_close(ours_input.grad, kornia_input.grad, rtol=1e-8, atol=1e-12)


# segmentation_models_pytorch's tests/test_losses.py: binary DiceLoss / TverskyLoss(0.5, 0.5) / JaccardLoss with
# from_logits=False; probabilities of exactly 0 and 1 are logits of ±1000 here. Its DiceLoss pools over the batch
# (batch=True) and zeroes the loss of a class without targets (absent_classes="zero"): an empty target scores 0.
SMP_BINARY_CASES = [
    ([1.0, 1.0, 1.0], [1, 1, 1], 0.0), ([1.0, 0.0, 1.0], [1, 0, 1], 0.0), ([0.0, 0.0, 0.0], [0, 0, 0], 0.0),
    ([1.0, 1.0, 1.0], [0, 0, 0], 0.0), ([1.0, 0.0, 1.0], [0, 1, 0], 1.0), ([0.0, 0.0, 0.0], [1, 1, 1], 1.0),
]


@pytest.mark.parametrize("name,params", [("dice", {}), ("tversky", {"alpha": 0.5, "beta": 0.5}), ("iou", {})])
@pytest.mark.parametrize("probabilities,targets,expected", SMP_BINARY_CASES)
def test_absent_classes_zero_is_smps_own_test_numbers(name, params, probabilities, targets, expected):
    logits = (torch.tensor(probabilities, dtype=torch.float64) * 2 - 1).mul(1000.0).view(1, 1, 1, -1)
    labels = torch.tensor(targets, dtype=torch.float64).view(1, 1, 1, -1)
    module = losses.build(name, absent_classes="zero", batch=True, smooth_nr=0.0, smooth_dr=0.0, **params)
    assert float(module(logits, labels)) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("name,smp_name,params", [
    ("dice", "DiceLoss", {}), ("iou", "JaccardLoss", {}), ("tversky", "TverskyLoss", {"alpha": 0.3, "beta": 0.7}),
])
def test_absent_classes_zero_is_smps_loss(mode, name, smp_name, params):
    r"""segmentation_models_pytorch's region losses (their own code, from logits, smooth 0): batch=True,
    absent_classes="zero", with classes absent from the batch; values and gradients."""
    from bench.bench_peers import smp_losses

    generator = torch.Generator().manual_seed(11)
    channels = 1 if mode == "binary" else 3
    logits = torch.randn(4, channels, 5, 5, generator=generator, dtype=torch.float64)
    if mode == "multiclass":
        labels = torch.randint(0, 2, (4, 5, 5), generator=generator)
    else:
        labels = (torch.rand(4, channels, 5, 5, generator=generator) < 0.3).double()
        labels[:, -1] = 0 if mode == "multilabel" else labels[:, -1]
    peer = getattr(smp_losses(), smp_name)(mode=mode, from_logits=True, smooth=0.0, eps=1e-7, **params)
    ours = losses.build(name, mode=mode, batch=True, absent_classes="zero", smooth_nr=0.0, smooth_dr=0.0, **params)
    ours_input, peer_input = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    expected, actual = peer(peer_input, labels), ours(ours_input, labels)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    actual.backward()
    expected.backward()
    torch.testing.assert_close(ours_input.grad, peer_input.grad, rtol=1e-8, atol=1e-12)


def _kornia_macro(**params):
    return losses.build("dice", mode="multiclass", absent_classes="skip", smooth_nr=0.0, smooth_dr=1e-8, **params)


def test_absent_classes_skip_is_kornias_own_test_numbers():
    r"""kornia's tests/losses/test_dice.py, average="macro" (eps 1e-8): a sample's loss is the average over the
    classes present in its target, a sample without any scores 1."""
    labels = torch.tensor([[[1, -100]], [[-100, -100]]])
    logits = torch.zeros((2, 3, 1, 2), dtype=torch.float64)
    for weight in (None, torch.tensor([8.0, 0.25, 4.0], dtype=torch.float64)):
        loss = _kornia_macro(ignore_index=-100, class_weight=weight)(logits, labels)
        assert float(loss) == pytest.approx(0.75, abs=1e-6)  # test_macro_ignored_samples
    labels = torch.tensor([[[0, 0, 0, 0]], [[0, 1, 1, 2]]])
    logits = torch.tensor([[[[2.0, 0.0, 1.0, -1.0]], [[0.0, 2.0, 0.0, 1.0]], [[1.0, 1.0, 3.0, 2.0]]],
                           [[[1.0, 3.0, 2.0, 0.0]], [[2.0, 0.0, 1.0, 3.0]], [[0.0, 2.0, 0.0, 1.0]]]],
                          dtype=torch.float64, requires_grad=True)
    module = _kornia_macro(class_weight=torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    alone = module(logits[:1], labels[:1])  # test_macro_sample_without_weighted_class
    assert float(alone.detach()) == 1.0
    both = module(logits, labels)
    assert float(both.detach()) == pytest.approx((1 + float(module(logits[1:], labels[1:]).detach())) / 2, rel=1e-12)
    both.backward()
    assert (logits.grad[0] == 0).all() and torch.isfinite(logits.grad).all()
    logits = torch.zeros(4, 3, 1, 4, dtype=torch.float64)
    logits[:, 0, :, 0] = 100.0
    logits[:, 2, :, 1:] = 100.0
    labels = torch.tensor([0, 1, 2, 2]).expand((4, 1, -1))
    for weight, expected in (([1.0, 0.0, 0.0], 0.0), ([0.0, 1.0, 0.0], 1.0), ([0.0, 0.0, 1.0], 0.2)):  # test_weight
        loss = _kornia_macro(class_weight=torch.tensor(weight, dtype=torch.float64))(logits, labels)
        assert float(loss) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("weighted", [False, True])
def test_absent_classes_skip_is_kornias_macro_dice(weighted):
    r"""kornia's dice_loss(average="macro") (its own code) with absent classes, ignored pixels and class weights,
    values and gradients."""
    from kornia.losses import dice_loss

    generator = torch.Generator().manual_seed(12)
    logits = torch.randn(5, 4, 6, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (5, 6, 6), generator=generator)
    labels[1] = 0
    labels[2, :3] = -100
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64) if weighted else None
    ours_input, peer_input = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    actual = _kornia_macro(ignore_index=-100, class_weight=weight)(ours_input, labels)
    expected = dice_loss(peer_input, labels, average="macro", eps=1e-8, weight=weight, ignore_index=-100)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    actual.backward()
    expected.backward()
    torch.testing.assert_close(ours_input.grad, peer_input.grad, rtol=1e-8, atol=1e-12)


def test_absent_classes_is_a_choice_checked_everywhere():
    with pytest.raises(ValueError, match="absent_classes"):
        losses.build("dice", absent_classes="drop")
    scripted = torch.jit.script(losses.build("dice", mode="multilabel"))
    logits, labels = torch.randn(2, 3, 4), (torch.rand(2, 3, 4) < 0.3).float()
    scripted.absent_classes = "zero"
    expected = losses.build("dice", mode="multilabel", absent_classes="zero")(logits, labels)
    torch.testing.assert_close(scripted(logits, labels), expected)
    scripted.absent_classes = "drop"
    with pytest.raises(torch.jit.Error, match="absent_classes must be one of 'count', 'zero', 'skip'"):
        scripted(logits, labels)
    from loss_service.losses.region import ABSENT_CLASSES, absent_classes_code

    assert [absent_classes_code(name) for name in ABSENT_CLASSES] == list(range(len(ABSENT_CLASSES)))
