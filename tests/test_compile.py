r"""Every loss module under ``torch.compile(module, fullgraph=True, dynamic=True)``: one graph, no
graph break (``fullgraph=True`` turns a break into an error), no recompile when the batch grows, and
the eager values and gradients. Generated from the registry, as tests/test_losses.py.
"""
import pytest
import torch

from loss_service import losses

from .test_losses import TOLERANCES

# The first setting and the one with the most options (the last) of every loss.
CASES = [
    pytest.param(spec.name, index, id=f"{spec.name}-{index}")
    for spec in losses.specs()
    for index in sorted({0, len(spec.test_params) - 1})
]


def _inputs(spec, params, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    predictions, targets = spec.make_inputs(batch, 3, (5,), generator, torch.float32, params)
    weights = torch.rand(batch, generator=generator) + 0.5
    return predictions, targets, weights


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every loss module shares Loss.forward: a reset keeps one test's compiles out of the next's
    # recompile count.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name, index", CASES)
def test_compiled_module_has_one_graph_and_the_eager_values_and_gradients(name, index):
    spec = losses.get(name)
    params = spec.test_params[index]
    module = losses.build(name, **params)
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    rtol, atol = TOLERANCES[torch.float32]
    for call, batch in enumerate((4, 7)):
        predictions, targets, weights = _inputs(spec, params, batch, seed=call)
        leaf = predictions.clone().requires_grad_(True)
        # After the first call the graph must serve every batch size: a recompile is an error.
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            got = compiled(leaf, targets, weights)
        (got_grad,) = torch.autograd.grad(got.sum(), leaf)
        eager_leaf = predictions.clone().requires_grad_(True)
        want = module(eager_leaf, targets, weights)
        (want_grad,) = torch.autograd.grad(want.sum(), eager_leaf)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=atol)


def test_compiled_module_reads_a_changed_hyperparameter():
    module = losses.build("focal", gamma=2.0)
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    spec = losses.get("focal")
    predictions, targets, _ = _inputs(spec, {}, 4, seed=0)
    compiled(predictions, targets)
    module.gamma = 0.5
    torch.testing.assert_close(compiled(predictions, targets), module(predictions, targets))
