r"""docs/architecture.md's "How to add a loss", followed: a loss registered here (``tests/toy_loss.py``)
with no other change gets the generated loss tests, an exported and verified TorchScript module and
ONNX graph, and gRPC scoring on every backend, equal to eager PyTorch.

The generated tests of ``test_losses.py`` and ``test_server.py`` are parametrised over the registry
when their module is imported, so each is imported afresh while the toy loss is registered and its
tests whose parameters name a loss are run for the toy loss alone.
"""
import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from loss_service import export
from loss_service.client import LossClient
from loss_service.server import BackgroundServer, ServerConfig

from . import toy_loss

pytestmark = pytest.mark.timeout(600)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def toy():
    with toy_loss.registered() as spec:
        yield spec


def fresh_copy(module: str):
    r"""``tests/<module>.py`` imported again under another name, so that its parameters see the registry now."""
    spec = importlib.util.spec_from_file_location(f"tests._{module}_now", TESTS / f"{module}.py")
    copy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = copy
    try:
        spec.loader.exec_module(copy)
    finally:
        del sys.modules[spec.name]
    return copy


def cases_for(function: Callable[..., Any], loss: str) -> List[Dict[str, Any]]:
    r"""The keyword sets of ``function``'s ``parametrize`` marks that name ``loss`` (none unless one names a loss)."""
    axes = []
    for mark in getattr(function, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [name.strip() for name in mark.args[0].split(",")] if isinstance(mark.args[0], str) else list(mark.args[0])
        rows = [tuple(getattr(value, "values", (value,) if len(names) == 1 else value)) for value in mark.args[1]]
        axes.append([dict(zip(names, row)) for row in rows])
    cases = [dict(kv for axis in combination for kv in axis.items()) for combination in itertools.product(*axes)]
    return [case for case in cases if case.get("name") == loss]


def run_generated(module: str, loss: str, **fixtures: Any) -> List[str]:
    r"""Run every test of ``tests/<module>.py`` parametrised by loss name for ``loss``; their names."""
    copy = fresh_copy(module)
    ran = []
    for name in sorted(vars(copy)):
        function = getattr(copy, name)
        if not name.startswith("test_") or not callable(function):
            continue
        for case in cases_for(function, loss):
            function(**case, **{k: v for k, v in fixtures.items() if k in function.__code__.co_varnames})
            ran.append(name)
    return sorted(set(ran))


def test_a_new_loss_gets_the_generated_loss_tests(toy):
    ran = run_generated("test_losses", toy.name)
    for expected in ("test_matches_reference", "test_gradcheck", "test_module_equals_function",
                     "test_scripted_equals_eager", "test_statistics_are_additive_over_samples",
                     "test_empty_batch_is_finite", "test_low_precision_inputs_computed_in_float32",
                     "test_bad_parameters_raise_value_error_naming_them", "test_declared_forms_are_what_the_module_does",
                     "test_function_and_module_take_every_form_of_a_setting_the_registry_accepts"):
        assert expected in ran


def test_a_new_loss_is_exported_verified_and_served_on_every_backend(toy, tmp_path):
    result = export.export_losses(tmp_path, names=[toy.name], jobs=1)
    assert result.ok, export.summary_table(result.rows)
    assert sorted(row.file for row in result.rows) == [f"{toy.name}.onnx", f"{toy.name}.pt"]
    config = ServerConfig(port=0, artifacts=str(tmp_path), workers=1, export_missing=False)
    with BackgroundServer(config, address="127.0.0.1:0") as server, LossClient(server.target, timeout=60) as client:
        info = {loss.name: loss for loss in client.list_losses()}[toy.name]
        assert sorted(info.backends) == ["eager", "onnx", "torchscript"]
        ran = run_generated("test_server", toy.name, client=client)
    assert "test_every_backend_matches_eager_pytorch" in ran
