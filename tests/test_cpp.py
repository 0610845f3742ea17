r"""The C++ trainer example (deploy/cpp) against Python eager, for every registered loss.

The session builds ``loss_trainer`` once with cmake + the C++ compiler against the libtorch of the
installed torch wheel. Then, per registered loss (parametrised from the registry, so a new loss is
covered without touching this file), one ``loss_trainer --jobs`` process runs every case:

* every ``test_params`` setting, baked into the ``.pt`` in Python, with no weights, per-sample
  and elementwise weights, and every other reduction set from C++ (``--reduction``);
* the ``.pt`` built with the defaults and *configured from C++*: each non-default ``test_params``
  setting (numbers and strings by ``--set name=value``, tensors by name from the inputs file) and
  a non-default value of every float hyperparameter (``gamma`` of the focal losses, ...);
* one float32 case.

Each is compared with the eager module built in Python with the same hyperparameters on the same
inputs: the loss (the value, or the sum of the values for ``reduction="none"``) and the sum and
absolute sum of d(sum of output)/d(predictions), and a position-weighted sum of it (the plain sum of
a softmax loss's gradient is ~0). Inputs are float64, so the tolerance is tight
(the C++ and Python runs execute the same TorchScript/ATen kernels; only summation order may
differ): rtol 1e-10, atol 1e-12; float32: rtol 1e-5, atol 1e-6.

Set ``LOSS_TRAINER_BUILD_DIR`` to reuse a build directory between sessions (cmake rebuilds only
what changed); by default the build lives in pytest's temporary directory.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loss_service import losses

ROOT = Path(__file__).resolve().parents[1]
CPP_DIR = ROOT / "deploy" / "cpp"
NUM_CLASSES = 3
SPATIAL = (3, 4)
BATCH = 3
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}
OTHER_REDUCTIONS = [r for r in losses.REDUCTIONS if r != "mean"]


def _load_write_inputs():
    spec = importlib.util.spec_from_file_location("loss_trainer_write_inputs", CPP_DIR / "write_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_inputs_module = _load_write_inputs()


def _missing_toolchain():
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(compiler) for compiler in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (c++, g++ or clang++)")
    return missing


@pytest.fixture(scope="session")
def loss_trainer(tmp_path_factory):
    r"""Path of the built ``loss_trainer``, configured with the wheel's libtorch and C++ ABI."""
    missing = _missing_toolchain()
    if missing:
        pytest.skip(f"cannot build the C++ trainer example: {' and '.join(missing)} not found on PATH")
    build_dir = Path(os.environ.get("LOSS_TRAINER_BUILD_DIR") or tmp_path_factory.mktemp("loss_trainer_build"))
    configure = [
        "cmake", "-S", str(CPP_DIR), "-B", str(build_dir),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DLOSS_TRAINER_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    started = time.monotonic()
    for command in (configure, ["cmake", "--build", str(build_dir), "-j2"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    sys.stderr.write(f"\nloss_trainer built in {time.monotonic() - started:.1f} s in {build_dir}\n")
    binary = build_dir / "loss_trainer"
    assert binary.is_file(), f"the build did not produce {binary}"
    return binary


def _make_inputs(spec, params, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return spec.make_inputs(BATCH, NUM_CLASSES, SPATIAL, generator, dtype, dict(params))


def _weights(spec, module, predictions, targets, kind, seed=1):
    if kind == "none":
        return None
    generator = torch.Generator().manual_seed(seed)
    if kind == "per_sample":
        return torch.rand(BATCH, generator=generator, dtype=predictions.dtype) + 0.1
    # Elementwise weights have the shape of the unreduced loss (the predictions' for region losses).
    shape = predictions.shape if spec.pixel_weights else module.statistics(predictions, targets, None, False)[0].shape
    return torch.rand(shape, generator=generator, dtype=predictions.dtype)


def _eager(name, params, predictions, targets, weights):
    r"""What the C++ trainer prints, computed with the eager module in Python."""
    module = losses.build(name, **params)
    leaf = predictions.detach().clone().requires_grad_(True)
    output = module(leaf, targets, weights)
    total = output.sum()
    if total.requires_grad:
        total.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return {
        "loss": total.double().item(),
        "loss_shape": list(output.shape),
        "loss_dtype": str(output.dtype).replace("torch.", ""),
        "grad_sum": grad.double().sum().item(),
        "grad_abs_sum": grad.double().abs().sum().item(),
        "grad_weighted_sum": (grad.double().reshape(-1) * (torch.arange(grad.numel(), dtype=torch.float64) % 7 + 1))
        .sum()
        .item(),
        "grad_shape": list(grad.shape),
    }


def _float_alternative(param):
    r"""A valid value of a float hyperparameter other than its default (``None`` if none is found)."""
    default = float(param.default)
    candidates = [default + 0.5, default * 0.5, default - 0.5]
    if param.low is not None and param.high is not None:
        candidates.append((param.low + param.high) / 2)
    for value in candidates:
        if value == default:
            continue
        try:
            return param.validate(value)
        except ValueError:
            continue
    return None


def _set_arguments(name, loss_name, value, scripted, extra_tensors):
    r"""``--set`` arguments for one hyperparameter, by the type of the scripted module's attribute."""
    assert hasattr(scripted, name), (
        f"{loss_name}: hyperparameter '{name}' is not an attribute of the scripted module, so a C++ trainer "
        f"cannot set it with module.setattr"
    )
    current = getattr(scripted, name)
    if isinstance(current, torch.Tensor):
        # Tensors travel in the inputs file; the trainer assigns the one named after the parameter.
        extra_tensors[name] = torch.as_tensor(value, dtype=current.dtype if current.is_floating_point() else None)
        return ["--set", f"{name}={name}"]
    assert not isinstance(value, torch.Tensor), (
        f"{loss_name}: hyperparameter '{name}' holds a tensor but its module attribute is {type(current).__name__}"
    )
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return ["--set", f"{name}={text}"]


def _cases(name, workdir):
    r"""Write the ``.pt`` files and inputs of every case; returns ``[(label, arguments, expected, dtype)]``."""
    spec = losses.get(name)
    cases = []
    saved = {}

    def script(params, tag):
        if tag not in saved:
            path = workdir / f"{name}-{tag}.pt"
            torch.jit.save(torch.jit.script(losses.build(name, **params)), str(path))
            saved[tag] = path
        return saved[tag]

    def add(label, loss_path, params, dtype, weight_kind, set_args=(), seed=0, tensor_params=None):
        predictions, targets = _make_inputs(spec, params, dtype, seed)
        weights = _weights(spec, losses.build(name, **params), predictions, targets, weight_kind)
        inputs_path = workdir / f"{name}-{len(cases)}-inputs.pt"
        write_inputs_module.write_inputs(str(inputs_path), predictions, targets, weights, tensors=tensor_params)
        expected = _eager(name, params, predictions, targets, weights)
        cases.append((label, [str(loss_path), str(inputs_path), *set_args], expected, dtype))

    for index, params in enumerate(spec.test_params):
        baked = script(params, f"params{index}")
        for weight_kind in ("none", "per_sample", "elementwise"):
            add(f"test_params[{index}] weights={weight_kind}", baked, params, torch.float64, weight_kind)
        for reduction in OTHER_REDUCTIONS:
            add(f"test_params[{index}] weights=per_sample --reduction {reduction}", baked,
                {**params, "reduction": reduction}, torch.float64, "per_sample", ["--reduction", reduction])

    defaults = script({}, "defaults")
    scripted_defaults = torch.jit.load(str(defaults))
    configured = [dict(params) for params in spec.test_params if params]
    for param in spec.params:
        if param.kind == "float":
            value = _float_alternative(param)
            if value is not None:
                configured.append({param.name: value})
    for params in configured:
        extra_tensors = {}
        set_args = []
        for param_name, value in params.items():
            set_args += _set_arguments(param_name, name, value, scripted_defaults, extra_tensors)
        # Every weight kind once across the configured cases, with a non-default reduction.
        weight_kind = ("per_sample", "elementwise", "none")[len(cases) % 3]
        add(f"defaults configured from C++ with {params} --reduction sum weights={weight_kind}", defaults,
            {**params, "reduction": "sum"}, torch.float64, weight_kind,
            set_args + ["--reduction", "sum"], tensor_params=extra_tensors)

    add("float32 defaults weights=per_sample", defaults, {}, torch.float32, "per_sample")
    return cases


def _run_jobs(binary, cases, workdir):
    jobs = workdir / "jobs.tsv"
    jobs.write_text("".join("\t".join(arguments) + "\n" for _, arguments, _, _ in cases))
    result = subprocess.run([str(binary), "--jobs", str(jobs)], capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == len(cases), f"expected {len(cases)} JSON lines, got:\n{result.stdout}\n{result.stderr}"
    return [json.loads(line) for line in lines], result.returncode


def _close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    return math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol)


@pytest.mark.parametrize("name", losses.names())
def test_cpp_trainer_matches_python(loss_trainer, tmp_path, name):
    cases = _cases(name, tmp_path)
    outputs, returncode = _run_jobs(loss_trainer, cases, tmp_path)
    failures = []
    for (label, arguments, expected, dtype), output in zip(cases, outputs):
        if "error" in output:
            failures.append(f"{label}: C++ error: {output['error']}")
            continue
        for key in ("loss_shape", "loss_dtype", "grad_shape"):
            if output[key] != expected[key]:
                failures.append(f"{label}: {key} C++ {output[key]} vs Python {expected[key]}")
        for key in ("loss", "grad_sum", "grad_abs_sum", "grad_weighted_sum"):
            if not _close(output[key], expected[key], dtype):
                failures.append(f"{label}: {key} C++ {output[key]!r} vs Python {expected[key]!r}")
        set_names = [arguments[i + 1].split("=", 1)[0] for i, arg in enumerate(arguments) if arg == "--set"]
        set_names += ["reduction"] * arguments.count("--reduction")
        if sorted(output["set"]) != sorted(set(set_names)):
            failures.append(f"{label}: C++ reports set {sorted(output['set'])}, expected {sorted(set(set_names))}")
    assert not failures, f"{name}: {len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)
    assert returncode == 0


def test_cpp_trainer_sets_hyperparameters_by_type(loss_trainer, tmp_path):
    r"""``--set`` parses by the attribute's type, reports what it set, and bad values fail clearly."""
    spec = losses.get("bce_with_logits")
    predictions, targets = _make_inputs(spec, {}, torch.float64, 0)
    inputs = tmp_path / "inputs.pt"
    pos_weight = torch.tensor([3.0, 0.5, 1.0])
    write_inputs_module.write_inputs(str(inputs), predictions, targets, tensors={"pw": pos_weight})
    loss = tmp_path / "loss.pt"
    torch.jit.save(torch.jit.script(losses.build("bce_with_logits")), str(loss))

    ok = subprocess.run([str(loss_trainer), str(loss), str(inputs), "--set", "pos_weight=pw", "--set",
                         "class_dim=1", "--reduction", "weighted_mean"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    output = json.loads(ok.stdout)
    assert output["set"] == {"pos_weight": {"tensor": "pw", "shape": [3]}, "class_dim": 1, "reduction": "weighted_mean"}
    expected = _eager("bce_with_logits", {"pos_weight": pos_weight, "reduction": "weighted_mean"}, predictions, targets, None)
    assert math.isclose(output["loss"], expected["loss"], rel_tol=1e-10, abs_tol=1e-12)

    bad = {
        ("--set", "gamma=2"): ("--set gamma: the loss has no such attribute; settable attributes:", "pos_weight (Tensor)"),
        ("--set", "class_dim=one"): ("--set class_dim: expected an integer, got 'one'",),
        ("--set", "pos_weight=missing"): ("the inputs file has no tensor named 'missing'",),
        ("--reduction", "median"): ("reduction must be one of 'none', 'mean', 'sum', 'weighted_mean', got 'median'",),
    }
    for arguments, messages in bad.items():
        result = subprocess.run([str(loss_trainer), str(loss), str(inputs), *arguments],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, (arguments, result.stdout)
        assert all(message in result.stderr for message in messages), (arguments, result.stderr)
        assert result.stderr.startswith("loss_trainer: error: "), result.stderr
    usage = subprocess.run([str(loss_trainer), str(loss)], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "expected <loss.pt> and <inputs.pt>" in usage.stderr


def test_write_inputs_rejects_bad_names(tmp_path):
    tensor = torch.zeros(2)
    with pytest.raises(ValueError, match="'weights' is reserved"):
        write_inputs_module.write_inputs(str(tmp_path / "x.pt"), tensor, tensor, tensors={"weights": tensor})
    with pytest.raises(ValueError, match="must be a Python identifier"):
        write_inputs_module.write_inputs(str(tmp_path / "x.pt"), tensor, tensor, tensors={"class.weight": tensor})
    with pytest.raises(ValueError, match="targets must be a torch.Tensor"):
        write_inputs_module.write_inputs(str(tmp_path / "x.pt"), tensor, [0, 1])
    write_inputs_module.write_inputs(str(tmp_path / "ok.pt"), tensor, tensor.long(), tensors={"cw": tensor + 1})
    saved = write_inputs_module.read_inputs(str(tmp_path / "ok.pt"))
    assert sorted(saved) == ["cw", "predictions", "targets"]
    assert saved["targets"].dtype == torch.int64
