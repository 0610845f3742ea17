r"""Class weights against scikit-learn, the published formulas and small examples worked by hand."""
import math

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from loss_service.weights import METHODS, class_counts, class_weights, make_sampler, sample_weights

# The imbalance of the blog example: 100000 / 100 / 10 samples.
BLOG_COUNTS = [100000, 100, 10]


def _blog_labels():
    return torch.cat([torch.full((n,), c) for c, n in enumerate(BLOG_COUNTS)])


def close(actual, expected, rtol=1e-6):
    torch.testing.assert_close(actual.to(torch.float64), torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=0)


def test_blog_counts_worked_by_hand():
    counts = torch.tensor(BLOG_COUNTS)
    close(class_weights(counts=counts, method="inverse"), [1e-5, 1e-2, 1e-1])
    close(class_weights(counts=counts, method="max_over_count"), [1.0, 1000.0, 10000.0])
    # n = 100110, K = 3: n / (K n_c).
    close(class_weights(counts=counts, method="balanced"), [100110 / 300000, 100110 / 300, 100110 / 30])
    # Flat median frequency: f = n_c / n, median f = 100 / n, weight = 100 / n_c.
    close(class_weights(counts=counts, method="median_frequency"), [1e-3, 1.0, 10.0])
    # Cui et al. with β = 0.999: 1 - β^n = 1 - 3.5e-44, 0.0952079, 0.0099551, so 1/(1-β^n) =
    # 1, 10.5033, 100.452 (sum 111.955), scaled to sum to 3.
    raw = [1 / (1 - 0.999**n) for n in BLOG_COUNTS]
    expected = [3 * r / sum(raw) for r in raw]
    close(class_weights(counts=counts, method="effective_number", beta=0.999), expected)
    assert expected == pytest.approx([0.0267967, 0.281455, 2.691749], rel=1e-5)


def test_labels_and_counts_give_the_same_weights():
    labels = _blog_labels()
    for method in METHODS:
        close(
            class_weights(labels, method, beta=0.99, dtype=torch.float64),
            class_weights(counts=BLOG_COUNTS, method=method, beta=0.99, dtype=torch.float64),
            rtol=1e-12,
        )


@pytest.mark.parametrize("seed", range(3))
def test_balanced_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(5, size=400, p=[0.6, 0.25, 0.1, 0.04, 0.01])
    classes = np.arange(5)
    assert set(labels) == set(classes)
    expected = compute_class_weight("balanced", classes=classes, y=labels)
    close(class_weights(labels, "balanced", dtype=torch.float64), expected, rtol=1e-12)
    # numpy int32 input and a plain list are accepted too.
    close(class_weights(labels.astype(np.int32), "balanced"), expected)
    close(class_weights(labels.tolist(), "balanced"), expected)


def test_effective_number_limits():
    counts = torch.tensor([50.0, 5.0, 1.0])
    # β = 0: every class weighs 1.
    close(class_weights(counts=counts, method="effective_number", beta=0.0), [1.0, 1.0, 1.0])
    # β → 1: (1-β)/(1-β^n) → 1/n, i.e. inverse frequency scaled to sum to K.
    inverse = 1 / counts
    close(class_weights(counts=counts, method="effective_number", beta=1 - 1e-9), 3 * inverse / inverse.sum(), rtol=1e-6)
    weights = class_weights(counts=counts, method="effective_number", beta=0.9, dtype=torch.float64)
    assert float(weights.sum()) == pytest.approx(3.0, rel=1e-12)


def test_median_frequency_on_label_maps_by_hand():
    labels = torch.tensor([[[0, 0], [0, 1]], [[0, 2], [2, 2]]])
    # Class 0: 4 pixels in both images (8 pixels) -> 0.5; class 1: 1 of the 4 pixels of image 0
    # -> 0.25; class 2: 3 of the 4 pixels of image 1 -> 0.75. Median 0.5.
    close(class_weights(labels, "median_frequency"), [1.0, 2.0, 2 / 3])
    # The per-image counts give the same; summed (K,) counts give the plain frequency instead.
    counts = class_counts(labels)
    assert counts.tolist() == [[3.0, 1.0, 0.0], [1.0, 0.0, 3.0]]
    close(class_weights(counts=counts, method="median_frequency"), [1.0, 2.0, 2 / 3])
    # Plain frequencies 0.5, 0.125, 0.375: median 0.375.
    close(class_weights(counts=counts.sum(0), method="median_frequency"), [0.75, 3.0, 1.0])


def test_median_frequency_on_a_flat_vector_and_even_class_count():
    # Frequencies 0.75 and 0.25: the median of two values is their mean, 0.5.
    close(class_weights(torch.tensor([0, 0, 0, 1]), "median_frequency"), [2 / 3, 2.0])


def test_ignore_index_on_label_maps():
    labels = torch.tensor([[[0, 255], [1, 1]], [[255, 255], [0, 1]]])
    assert class_counts(labels, ignore_index=255).tolist() == [[1.0, 2.0], [1.0, 1.0]]
    # Ignored pixels do not count towards an image's size: class 0 is 2 of the 5 counted pixels of
    # the images containing it (0.4), class 1 is 3 of 5 (0.6); median 0.5.
    close(class_weights(labels, "median_frequency", ignore_index=255), [1.25, 5 / 6])
    close(class_weights(labels, "balanced", ignore_index=255), [5 / 4, 5 / 6])


@pytest.mark.parametrize("method", METHODS)
def test_absent_class_gets_zero_and_leaves_the_present_weights_unchanged(method):
    labels = torch.tensor([0, 0, 0, 2, 2, 3])
    declared = class_weights(labels, method, num_classes=6, dtype=torch.float64)
    assert torch.isfinite(declared).all()
    assert declared[1] == 0 and declared[4] == 0 and declared[5] == 0
    present_only = class_weights(torch.tensor([0, 0, 0, 1, 1, 2]), method, dtype=torch.float64)
    close(declared[[0, 2, 3]], present_only, rtol=1e-12)
    assert (declared[[0, 2, 3]] > 0).all()


def test_absent_class_on_label_maps_median_frequency():
    labels = torch.tensor([[[0, 2], [2, 2]]])
    weights = class_weights(labels, "median_frequency", num_classes=3)
    assert torch.isfinite(weights).all() and weights[1] == 0


def test_result_dtype_and_device():
    weights = class_weights(torch.tensor([0, 1, 1]))
    assert weights.dtype == torch.float32 and weights.shape == (2,)
    assert class_weights(torch.tensor([0, 1, 1]), dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: class_weights(torch.tensor([0, -1, 2])), r"labels must be class indices >= 0, got -1"),
        (lambda: class_weights(torch.tensor([0, 3]), num_classes=3), r"labels must be < num_classes=3, got 3"),
        (lambda: class_weights(torch.tensor([], dtype=torch.int64)), "labels must contain at least one labelled element"),
        (lambda: class_weights(torch.full((2, 2), 255), ignore_index=255), "ignore_index=255"),
        (lambda: class_weights(torch.tensor([0.0, 1.0])), "labels must be integer class indices"),
        (lambda: class_weights(torch.tensor([0, 1]), method="inverse_sqrt"), "method must be one of"),
        (lambda: class_weights(torch.tensor([0, 1]), method="effective_number", beta=1.0), r"beta must be a number in \[0, 1\)"),
        (lambda: class_weights(torch.tensor([0, 1]), method="effective_number", beta=-0.1), "beta"),
        (lambda: class_weights(torch.tensor([0, 1]), num_classes=0), "num_classes must be a positive integer"),
        (lambda: class_weights(), "exactly one of labels"),
        (lambda: class_weights(torch.tensor([0, 1]), counts=[1, 1]), "exactly one of labels"),
        (lambda: class_weights(counts=[]), "counts must be a non-empty"),
        (lambda: class_weights(counts=[0, 0]), "counts must count at least one element"),
        (lambda: class_weights(counts=[3, -1]), "counts must be finite and >= 0"),
        (lambda: class_weights(counts=[3, 1], num_classes=3), "counts must have num_classes=3"),
        (lambda: class_weights(counts=[3, 1], ignore_index=0), "ignore_index"),
        (lambda: class_weights(torch.tensor(2)), "labels must have a sample dimension"),
        (lambda: sample_weights(torch.tensor([0, 2]), torch.tensor([1.0, 2.0])), "labels must be < num_classes=2"),
        (lambda: sample_weights(torch.tensor([0, 1]), torch.tensor([1.0, -2.0])), "class_weights must be finite and >= 0"),
        (lambda: make_sampler(torch.tensor([[0, 1]])), r"labels must be one class per sample, shape \(N,\)"),
        (lambda: make_sampler(torch.tensor([0, 1]), num_samples=0), "num_samples must be a positive integer"),
        (lambda: make_sampler(torch.tensor([0, 1]), num_samples=3, replacement=False), "num_samples must be <="),
        (lambda: make_sampler(torch.tensor([0, 1]), method="nope"), "method must be one of"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_sample_weights_are_the_class_weights_of_the_labels():
    weights = torch.tensor([0.5, 2.0, 10.0])
    labels = torch.tensor([[2, 0], [1, -100]])
    result = sample_weights(labels, weights, ignore_index=-100)
    assert result.tolist() == [[10.0, 0.5], [2.0, 0.0]]


@pytest.mark.parametrize("method", ["inverse", "max_over_count", "balanced", "median_frequency"])
def test_inverse_frequency_sample_weights_give_every_class_the_same_total(method):
    labels = _blog_labels()
    weights = sample_weights(labels, class_weights(labels, method, dtype=torch.float64))
    totals = torch.zeros(3, dtype=torch.float64).index_add_(0, labels, weights)
    close(totals, totals.mean().expand(3), rtol=1e-9)
    # The blog's 1 / class weight instead gives class totals proportional to n_c²: 1e10 : 1e4 : 1e2.
    inverted = torch.zeros(3, dtype=torch.float64).index_add_(0, labels, 1 / weights)
    close(inverted / inverted[2], [1e8, 1e2, 1.0], rtol=1e-9)


@pytest.mark.parametrize("method", ["inverse", "balanced", "median_frequency"])
def test_sampler_draws_classes_in_balance(method):
    labels = _blog_labels()
    sampler = make_sampler(labels, method=method, num_samples=30000, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler)
    indices = list(sampler)
    drawn = labels[torch.tensor(indices)]
    fractions = torch.bincount(drawn, minlength=3).double() / drawn.numel()
    # Each class has probability 1/3; 30000 draws give a standard deviation of 0.0027.
    assert torch.allclose(fractions, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015), fractions
    # Same generator seed, same epoch.
    again = make_sampler(labels, method=method, num_samples=30000, generator=torch.Generator().manual_seed(0))
    assert list(again) == indices


def test_sampler_with_effective_number_lies_between_data_and_balance():
    labels = _blog_labels()
    sampler = make_sampler(labels, method="effective_number", beta=0.999, num_samples=20000,
                           generator=torch.Generator().manual_seed(1))
    fractions = torch.bincount(labels[torch.tensor(list(sampler))], minlength=3).double() / 20000
    # Expected class probabilities ∝ n_c / (1 - β^n_c): 100000, 1050.3, 1004.5 -> 0.9797, 0.0103, 0.0098.
    raw = [n / (1 - 0.999**n) for n in BLOG_COUNTS]
    expected = torch.tensor([r / sum(raw) for r in raw], dtype=torch.float64)
    assert torch.allclose(fractions, expected, atol=0.005), fractions
    data = torch.tensor(BLOG_COUNTS, dtype=torch.float64) / sum(BLOG_COUNTS)
    assert fractions[2] > 5 * data[2]


def test_sampler_without_replacement_covers_each_sample_once():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    sampler = make_sampler(labels, replacement=False, generator=torch.Generator().manual_seed(0))
    assert sorted(sampler) == list(range(6))


def test_counts_accumulated_per_batch_equal_counts_of_the_whole_set():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (6, 5, 5), generator=generator)
    batched = torch.cat([class_counts(labels[:2], 4), class_counts(labels[2:], 4)])
    assert torch.equal(batched, class_counts(labels, 4))
    close(class_weights(counts=batched, method="median_frequency"), class_weights(labels, "median_frequency"), rtol=1e-12)
    assert math.isclose(float(batched.sum()), labels.numel())
