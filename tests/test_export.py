r"""``python -m loss_service.export``: artifacts of every registered loss, verified against eager, and the CLI.

The session's one export (``tests/conftest.py``: every loss, both formats, every ONNX variant,
``standard`` verification, 2 worker processes) is what these tests check, and what the server
tests then serve; tests that need a broken artifact or a CLI run export a few losses of their own.
"""
import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from loss_service import export
from loss_service.export import __main__ as cli
from loss_service.export import artifacts, manifest, verify
from loss_service import layout, losses

ROOT = Path(__file__).resolve().parents[1]
LOSS_NAMES = losses.names()
ACCURACY_LOSSES = [name for name in ("bce_with_logits", "binary_focal", "focal") if name in LOSS_NAMES]


@pytest.fixture(scope="module")
def exported(exported_artifacts):
    return exported_artifacts.folder, exported_artifacts.result


def _entry(result, file):
    matches = [entry for entry in result.manifest["artifacts"] if entry["file"] == file]
    assert matches, f"{file} missing from the manifest"
    return matches[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_exports_and_verifies_in_both_formats(exported, name):
    out, result = exported
    spec = losses.get(name)
    failed = [f"{row.file}: {row.error}" for row in result.rows if row.loss == name and not row.ok]
    assert not failed, failed
    assert sorted(row.file for row in result.rows if row.loss == name) == sorted(
        job.file for job in export.plan([name])), "every variant of the loss is exported"
    for file, fmt in ((f"{name}.pt", "torchscript"), (f"{name}.onnx", "onnx")):
        assert (out / file).is_file()
        entry = _entry(result, file)
        assert entry["format"] == fmt
        checks = {check["name"]: check for check in entry["verification"]["checks"]}
        assert entry["verification"]["passed"], checks
        expected = {"parity"} | ({"gradient_parity", "statistics_parity"} if fmt == "torchscript" else
                                 {"onnx_checker", "float64_accumulation"})
        if spec.predictions == "logits":
            expected.add("extreme_logits")
        assert expected <= set(checks), sorted(checks)
        assert all(check["cases"] > 0 for check in checks.values())


def test_manifest_contents_and_checksums(exported):
    out, result = exported
    written = json.loads((out / manifest.MANIFEST_NAME).read_text())
    assert written == result.manifest
    assert set(written["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert written["versions"]["torch"] == torch.__version__
    assert written["opset"] == artifacts.DEFAULT_OPSET
    assert written["run"]["jobs"] == 2
    # Every entry is tied to the sources it was exported from (and those are today's).
    assert written["fingerprint"] == manifest.fingerprint()
    files = [entry["file"] for entry in written["artifacts"]]
    assert files == sorted(files)
    for entry in written["artifacts"]:
        path = out / entry["file"]
        assert entry["sha256"] == manifest.sha256(path)
        assert entry["size_bytes"] == path.stat().st_size
        assert entry["fingerprint"] == written["fingerprint"]
        spec = losses.get(entry["loss"])
        assert [p["name"] for p in entry["hyperparameters"]] == spec.param_names()
        if entry["format"] != "onnx":
            continue
        names = [i["name"] for i in entry["inputs"]]
        assert names == layout.onnx_input_names(spec)
        assert [o["name"] for o in entry["outputs"]] == layout.ONNX_OUTPUTS
        inputs = {i["name"]: i for i in entry["inputs"]}
        assert inputs["predictions"]["dtype"] == "float32"
        assert 0 in inputs["predictions"]["dynamic_axes"] and 2 in inputs["predictions"]["dynamic_axes"]
        assert inputs["reduction"]["dtype"] == "int64" and inputs["reduction"]["codes"] == layout.REDUCTION_CODES
        for name in names[2:]:
            assert "default" in inputs[name], (entry["file"], name)
        outputs = {o["name"]: o for o in entry["outputs"]}
        assert outputs["loss"]["dtype"] == "float64" and outputs["totals"]["dtype"] == "float64"


def _feeds_from_manifest(entry, batch, num_classes, size, generator):
    r"""Feeds built from the manifest alone, as a generic ONNX Runtime caller would."""
    sizes = {"N": batch, "C": num_classes, "S": size}
    feeds = {}
    for spec in entry["inputs"]:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec["shape"]]
        if spec["role"] == "predictions":
            feeds[spec["name"]] = torch.randn(shape, generator=generator).numpy()
        elif spec["role"] == "targets":
            if spec["dtype"] == "int64":
                feeds[spec["name"]] = torch.randint(0, shape[1] if len(shape) > 2 else num_classes, shape, generator=generator).numpy()
            else:
                feeds[spec["name"]] = (torch.rand(shape, generator=generator) < 0.5).float().numpy()
        else:
            default = spec["default"]
            value = default.get("value", default.get("fill"))
            default_shape = [sizes[d] if isinstance(d, str) else d for d in default.get("shape", [])]
            feeds[spec["name"]] = np.full(default_shape, value, dtype=np.dtype(spec["dtype"]))
    return feeds


def test_onnx_graph_runs_from_the_manifest_alone(exported):
    out, result = exported
    entry = _entry(result, "bce_with_logits.onnx")
    session = onnxruntime.InferenceSession(str(out / entry["file"]), providers=["CPUExecutionProvider"])
    feeds = _feeds_from_manifest(entry, 3, 5, 7, torch.Generator().manual_seed(0))
    loss, values, totals, sample_totals, class_totals = session.run(layout.ONNX_OUTPUTS, feeds)
    expected = losses.build("bce_with_logits")(torch.from_numpy(feeds["predictions"]), torch.from_numpy(feeds["targets"]))
    assert values.shape == (3, 5, 7) and sample_totals.shape[0] == 3 and class_totals.shape == (5, 4)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in ("cross_entropy", "bce_with_logits") if n in LOSS_NAMES])
def test_layout_channels_last_and_weights_through_the_onnx_graph(exported, name):
    out, _ = exported
    spec = losses.get(name)
    session = onnxruntime.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(5)
    predictions, targets = spec.make_inputs(2, 3, (4, 3), generator, torch.float32, {})
    predictions = predictions.movedim(1, -1).contiguous()
    if targets.dim() == predictions.dim():
        targets = targets.movedim(1, -1).contiguous()
    weights = torch.rand(2)
    for reduction in ("none", "mean", "weighted_mean"):
        params = {"class_dim": -1, "reduction": reduction}
        feeds, restore = layout.to_canonical(spec, params, predictions, targets, weights)
        assert feeds["predictions"].shape == (2, 3, 12)
        loss, values, _, _, class_totals = session.run(layout.ONNX_OUTPUTS, feeds)
        module = losses.build(name, **params)
        expected = module(predictions, targets, weights)
        actual = restore(values) if reduction == "none" else loss
        np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-5, atol=1e-6)
        # The classes of the channels-last predictions, in their order.
        expected_classes = module.statistics(predictions, targets, weights, False, False, True)[2]
        np.testing.assert_allclose(class_totals, expected_classes.numpy(), rtol=1e-5, atol=1e-6)


def test_layout_one_dimensional_predictions_round_trip():
    spec = losses.get("bce")
    predictions, targets = torch.rand(6), (torch.rand(6) > 0.5).float()
    feeds, restore = layout.to_canonical(spec, {"reduction": "none"}, predictions, targets, torch.rand(6))
    assert feeds["predictions"].shape == (6, 1, 1) and feeds["weights"].shape == (6, 1, 1)
    assert feeds["class_weight"].shape == (1,) and feeds["reduction"] == layout.REDUCTION_CODES["none"]
    assert restore(np.arange(6, dtype=np.float32).reshape(6, 1, 1)).shape == (6,)


def test_layout_rejects_bad_inputs_naming_them():
    spec = losses.get("bce")
    with pytest.raises(ValueError, match="targets"):
        layout.to_canonical(spec, {}, torch.rand(2, 3, 4), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match=r"weights.*\[7\]"):
        layout.to_canonical(spec, {}, torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.rand(7))
    with pytest.raises(ValueError, match="class_weight"):
        layout.to_canonical(spec, {"class_weight": torch.ones(4)}, torch.rand(2, 3, 4), torch.rand(2, 3, 4))


def test_provider_selection_falls_back_to_cpu():
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert layout.select_providers("auto", cuda, gpu_present=False) == ["CPUExecutionProvider"]
    assert layout.select_providers("auto", cuda, gpu_present=True) == cuda
    assert layout.select_providers("cpu", cuda, gpu_present=True) == ["CPUExecutionProvider"]
    assert layout.select_providers("auto", ["CPUExecutionProvider"], gpu_present=True) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="cuda"):
        layout.select_providers("cuda", cuda, gpu_present=False)
    with pytest.raises(ValueError, match="device"):
        layout.select_providers("tpu", cuda, gpu_present=False)


@pytest.mark.parametrize("name", [n for n in ("focal", "binary_focal") if n in LOSS_NAMES])
def test_torchscript_hyperparameter_setattr_without_reexport(exported, name):
    out, _ = exported
    spec = losses.get(name)
    scripted = torch.jit.load(str(out / f"{name}.pt"))
    predictions, targets = spec.make_inputs(2, 3, (4,), torch.Generator().manual_seed(2), torch.float32, {})
    before = scripted(predictions, targets)
    scripted._c.setattr("gamma", 3.5)  # what C++'s module.setattr("gamma", 3.5) does
    setattr(scripted, "class_weight", torch.tensor([0.5, 2.0, 1.0]))
    after = scripted(predictions, targets)
    expected = losses.build(name, gamma=3.5, class_weight=torch.tensor([0.5, 2.0, 1.0]))(predictions, targets)
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("name", ACCURACY_LOSSES)
def test_1e7_element_reductions_agree_with_float64(exported, name):
    out, _ = exported
    spec = losses.get(name)
    with artifacts.quiet():
        scripted = torch.jit.load(str(out / f"{name}.pt"))
    checks = [
        verify._torchscript_accuracy(spec, scripted),
        verify._onnx_accuracy(spec, {}, verify.onnx_session(out / f"{name}.onnx", "cpu")),
    ]
    for check in checks:
        assert check.passed and check.cases == 4, check.as_dict()
        assert check.max_rel <= verify.ACCURACY_RTOL


def test_verification_catches_log_of_sigmoid(tmp_path, monkeypatch):
    r"""The ±1e4 trap: an exported Log(Sigmoid(x)) gives -inf, and the verification must say so."""
    from loss_service.losses import bce

    monkeypatch.setattr(bce, "log_sigmoid", lambda x: torch.log(torch.sigmoid(x)))
    spec = losses.get("bce_with_logits")
    path = tmp_path / "unstable.onnx"
    artifacts.export_onnx(spec, {}, path)
    checks = {c.name: c for c in verify.verify_onnx(spec, {}, path, "standard", "cpu")}
    assert not checks["extreme_logits"].passed
    assert any("non-finite" in failure for failure in checks["extreme_logits"].failures)


def test_verification_catches_float32_accumulation(tmp_path, monkeypatch):
    r"""The 1e7 trap's cause: a ReduceSum over float32 in the graph fails the float64_accumulation check."""
    from loss_service.losses import _reduction

    def float32_sums(x, dims=None):
        return (x.sum() if dims is None else x.sum(dims)).to(torch.float64)

    monkeypatch.setattr(_reduction, "accumulate", float32_sums)
    spec = losses.get("bce_with_logits")
    path = tmp_path / "float32_sums.onnx"
    artifacts.export_onnx(spec, {}, path)
    checks = {c.name: c for c in verify.check_onnx_model(path)}
    assert checks["onnx_checker"].passed
    assert not checks["float64_accumulation"].passed


def test_reexport_gives_the_same_manifest_entries(exported, tmp_path):
    out, result = exported
    again = export.export_losses(tmp_path, names=["bce"], verify="standard", all_variants=False)
    assert again.ok
    for file in ("bce.pt", "bce.onnx"):
        assert _entry(again, file) == _entry(result, file)


def _run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "loss_service.export", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_cli_help_documents_every_option():
    completed = _run_cli("--help")
    assert completed.returncode == 0
    for option in ("--out", "--loss", "--format", "--opset", "--verify", "--no-verify", "--device",
                   "--default-variants-only", "--jobs", "--no-progress"):
        assert option in completed.stdout


def test_python_m_export_in_a_checkout_is_the_packages_exporter():
    checkout = subprocess.run([sys.executable, "-m", "export", "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
    assert checkout.returncode == 0, checkout.stderr
    assert checkout.stdout == _run_cli("--help").stdout


def test_cli_unknown_loss_exits_non_zero_listing_valid_names(tmp_path):
    completed = _run_cli("--loss", "no_such_loss", "--out", str(tmp_path))
    assert completed.returncode != 0
    assert "no_such_loss" in completed.stderr
    for name in LOSS_NAMES:
        assert name in completed.stderr
    assert not (tmp_path / manifest.MANIFEST_NAME).exists()


def test_cli_loss_format_out_opset(tmp_path):
    completed = _run_cli("--loss", "bce", "--format", "torchscript", "--out", str(tmp_path), "--verify", "quick")
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bce.pt", "manifest.json"]
    assert "bce.pt" in completed.stdout and "max abs err" in completed.stdout
    completed = _run_cli("--loss", "bce", "--format", "onnx", "--out", str(tmp_path), "--opset", "18", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    written = manifest.load(tmp_path)
    assert [e["file"] for e in written["artifacts"]] == ["bce.onnx", "bce.pt"]  # the earlier run's entry is kept
    assert written["opset"] == 18 and _onnx_opset(tmp_path / "bce.onnx") == 18


def _onnx_opset(path):
    import onnx

    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def test_cli_failure_exit_status(tmp_path, monkeypatch, capsys):
    def broken(spec, path):
        raise RuntimeError("cannot script")

    monkeypatch.setattr(export, "export_torchscript", broken)
    status = cli.main(["--loss", "bce", "--format", "torchscript", "--out", str(tmp_path), "--no-progress"])
    assert status == 1
    output = capsys.readouterr().out
    assert "FAILED" in output and "cannot script" in output
    assert manifest.load(tmp_path)["artifacts"] == []


def test_on_artifact_reports_each_finished_artifact_with_its_failure(tmp_path, monkeypatch):
    def broken(spec, path):
        raise RuntimeError("cannot script")

    monkeypatch.setattr(export, "export_torchscript", broken)
    reported = []
    result = export.export_losses(tmp_path, names=["bce", "mse"], formats=["torchscript"], verify="none",
                                  on_artifact=reported.append)
    assert not result.ok
    assert [(p.file, p.done, p.total) for p in reported] == [("bce.pt", 1, 2), ("mse.pt", 2, 2)]
    assert all("cannot script" in p.error for p in reported)
    assert [p.seconds for p in reported] == sorted(p.seconds for p in reported) and reported[-1].seconds <= result.seconds


def test_cli_jobs_exports_in_worker_processes(exported, tmp_path):
    out, result = exported
    completed = _run_cli("--loss", "bce", "--loss", "mse", "--default-variants-only", "--jobs", "2", "--verify",
                         "quick", "--out", str(tmp_path), "--no-progress")
    assert completed.returncode == 0, completed.stderr
    for file in ("bce.pt", "bce.onnx", "mse.pt", "mse.onnx"):
        assert file in completed.stdout  # the summary table lists every artifact, in plan order
    written = manifest.load(tmp_path)
    assert written["run"]["jobs"] == 2 and written["run"]["verify"] == "quick"
    assert [e["file"] for e in written["artifacts"]] == ["bce.onnx", "bce.pt", "mse.onnx", "mse.pt"]
    for entry in written["artifacts"]:
        assert entry["verification"]["passed"] and entry["verification"]["level"] == "quick"
        # Worker processes write the same bytes as the session's export.
        assert entry["sha256"] == _entry(result, entry["file"])["sha256"]
    table = completed.stdout.splitlines()
    assert [line.split()[0] for line in table[2:6]] == ["bce.pt", "bce.onnx", "mse.pt", "mse.onnx"]


def test_cli_rejects_a_bad_jobs_count(tmp_path):
    completed = _run_cli("--loss", "bce", "--jobs", "0", "--out", str(tmp_path))
    assert completed.returncode == 2 and "--jobs" in completed.stderr
    assert not (tmp_path / manifest.MANIFEST_NAME).exists()


def test_export_losses_rejects_files_outside_the_plan(tmp_path):
    with pytest.raises(ValueError, match="no_such.onnx"):
        export.export_losses(tmp_path, names=["bce"], files=["bce.pt", "no_such.onnx"])
    with pytest.raises(ValueError, match="jobs"):
        export.export_losses(tmp_path, names=["bce"], jobs=0)


@pytest.fixture
def copied_sources(tmp_path, monkeypatch):
    r"""Copies of the fingerprinted sources (in folders of the same names), fingerprinted instead of them."""
    copies = []
    for source in manifest.fingerprint_sources():
        copy = tmp_path / source.parent.name / source.name
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(manifest, "fingerprint_sources", lambda: copies)
    return {f"{copy.parent.name}/{copy.name}": copy for copy in copies}


def _edit_documentation(text):
    r"""``text`` with its module docstring and first function docstring reworded, comments and blank lines added."""
    tree = ast.parse(text)
    function = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and ast.get_docstring(node))
    for documented in (tree, function):
        docstring = ast.get_docstring(documented, clean=False)
        text = text.replace(docstring, docstring + " Said once more, better.", 1)
    text = text.replace("\ndef ", "\n# Why the next function is there.\n\n\ndef ", 1)
    return f"# A comment above everything.\n{text}\n\n\"\"\"A string that is a comment.\"\"\"  # and one after it\n"


def _edit_a_constant(text):
    r"""``text`` with its first number literal (outside docstrings) one larger."""
    number = next(node for node in ast.walk(ast.parse(text))
                  if isinstance(node, ast.Constant) and type(node.value) in (int, float))
    lines = text.splitlines(keepends=True)
    line = lines[number.lineno - 1]
    lines[number.lineno - 1] = line[:number.col_offset] + repr(number.value + 1) + line[number.end_col_offset:]
    return "".join(lines)


def test_the_fingerprint_ignores_comments_and_docstrings_of_the_sources(copied_sources):
    before = manifest.fingerprint()
    assert manifest.fingerprint() == before  # deterministic
    for name in ("losses/focal.py", "loss_service/layout.py"):
        copy = copied_sources[name]
        edited = _edit_documentation(copy.read_text())
        assert edited != copy.read_text()
        copy.write_text(edited)
        assert manifest.fingerprint() == before, f"a documentation edit of {name} changed the fingerprint"


def test_the_fingerprint_follows_the_code_of_the_sources(copied_sources):
    before = manifest.fingerprint()
    for name in ("losses/focal.py", "export/artifacts.py"):
        copy = copied_sources[name]
        original = copy.read_text()
        copy.write_text(_edit_a_constant(original))
        assert manifest.fingerprint() != before, f"a changed constant in {name} kept the fingerprint"
        copy.write_text(original)
    assert manifest.fingerprint() == before


def test_the_fingerprint_follows_the_registry_declarations_and_the_versions(monkeypatch):
    before = manifest.fingerprint()
    specs = losses.specs()
    focal = losses.get("focal")
    gamma = focal.param("gamma")
    changed = dataclasses.replace(focal, params=tuple(
        dataclasses.replace(param, default=gamma.default + 1) if param is gamma else param for param in focal.params))
    monkeypatch.setattr(losses, "specs", lambda: [changed if spec is focal else spec for spec in specs])
    assert manifest.fingerprint() != before, "another default of a parameter kept the fingerprint"
    with_variant = dataclasses.replace(focal, variants=(*focal.variants, {"class_dim": 2}))
    monkeypatch.setattr(losses, "specs", lambda: [with_variant if spec is focal else spec for spec in specs])
    assert manifest.fingerprint() != before, "another ONNX variant kept the fingerprint"
    monkeypatch.setattr(losses, "specs", lambda: specs)
    assert manifest.fingerprint() == before
    versions = dict(manifest.versions(), onnxruntime="0.0.0")
    monkeypatch.setattr(manifest, "versions", lambda: versions)
    assert manifest.fingerprint() != before


def test_fingerprint_covers_the_loss_layout_and_exporter_sources():
    names = {f"{path.parent.name}/{path.name}" for path in manifest.fingerprint_sources()}
    assert {"losses/bce.py", "losses/_reduction.py", "losses/region.py", "loss_service/layout.py",
            "export/artifacts.py"} <= names


def test_manifest_write_is_atomic_and_drops_stale_entries(exported, tmp_path):
    out, result = exported
    for file in ("bce.pt", "mse.pt"):
        (tmp_path / file).write_bytes((out / file).read_bytes())
    current = manifest.fingerprint()
    bce, mse = dict(_entry(result, "bce.pt")), dict(_entry(result, "mse.pt"))
    manifest.write(tmp_path, [bce, dict(mse, fingerprint="stale")], artifacts.DEFAULT_OPSET, {}, "stale")
    # A later write (another --loss run, or the server's background exporter) keeps only current entries.
    written = manifest.write(tmp_path, [], artifacts.DEFAULT_OPSET, {}, current)
    assert [entry["file"] for entry in written["artifacts"]] == ["bce.pt"]
    assert manifest.load(tmp_path) == written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bce.pt", "manifest.json", "mse.pt"]  # no temp file left
    assert (tmp_path / manifest.MANIFEST_NAME).stat().st_mode & 0o777 == 0o644
