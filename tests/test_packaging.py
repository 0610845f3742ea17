r"""Packages by use: the wheel's contents and extras, the generated protocol code, and a fresh venv
with only ``loss-service[client]`` (no torch, no onnx, no onnxruntime) scoring against a server."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest
import torch

from loss_service import __version__, losses
from loss_service.server import BackgroundServer, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
PROTO = "loss_service/v1/loss_service.proto"
GENERATED = ("loss_service_pb2.py", "loss_service_pb2.pyi", "loss_service_pb2_grpc.py")
HEAVY = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript")


def _requirement_name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()


def _extras() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _resolved(extra: str) -> set:
    r"""The distributions an extra installs, following ``loss-service[...]`` references."""
    extras, names = _extras(), set()
    for requirement in extras[extra]:
        name = _requirement_name(requirement)
        if name == "loss-service":
            for inner in requirement.split("[", 1)[1].split("]", 1)[0].split(","):
                names |= _resolved(inner.strip())
        else:
            names.add(name)
    return names


def test_the_extras_install_what_each_use_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {_requirement_name(r) for r in project["dependencies"]} == {"numpy"}
    client = _resolved("client")
    assert {"grpcio", "grpcio-status", "protobuf"} <= client and not client & set(HEAVY)
    assert "torch" in _resolved("losses")
    assert "onnxruntime" in _resolved("server") and "onnxruntime-gpu" not in _resolved("server")
    assert "onnxruntime-gpu" in _resolved("gpu") and "onnxruntime" not in _resolved("gpu")
    assert _resolved("server") - {"onnxruntime"} == _resolved("gpu") - {"onnxruntime-gpu"}
    assert _resolved("server") <= _resolved("test")
    assert {"ray", "torch", "grpcio"} <= _resolved("ray") <= _resolved("test") and "ray" not in _resolved("server")
    constraints = {line.split("==")[0] for line in (ROOT / "constraints.txt").read_text().split() if "==" in line}
    for extra in _extras():
        unpinned = _resolved(extra) - constraints
        assert not unpinned, f"[{extra}] installs {sorted(unpinned)}, which constraints.txt does not pin"


def test_the_generated_protocol_code_is_what_protoc_makes_of_the_proto(tmp_path):
    r"""Regenerate with ``python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=.
    loss_service/v1/loss_service.proto`` (grpcio-tools as pinned in constraints.txt)."""
    from grpc_tools import protoc

    status = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                          f"--grpc_python_out={tmp_path}", str(ROOT / PROTO)])
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / "loss_service" / "v1" / name).read_text()
        assert fresh == (ROOT / "loss_service" / "v1" / name).read_text(), f"{name} is stale: regenerate it"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    r"""The project's wheel, built from a copy of the sources (the checkout gets no build folders)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "loss_service", source / "loss_service",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--disable-pip-version-check", "--wheel-dir", str(out), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    (built,) = out.glob("loss_service-*.whl")
    return built


def test_the_wheel_holds_the_package_the_proto_and_py_typed_and_no_top_level_export(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {PROTO, "loss_service/py.typed", "loss_service/export/__main__.py", "loss_service/client.py"} <= set(names)
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"loss_service"}
    info = f"loss_service-{__version__}.dist-info"
    metadata = Parser().parsestr(zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert set(metadata.get_all("Provides-Extra")) >= {"client", "losses", "service", "server", "gpu", "test"}
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "loss-service = loss_service.__main__:main" in entry_points
    assert "loss-service-export = loss_service.export.__main__:main" in entry_points


@pytest.fixture(scope="module")
def server(server_artifacts):
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), export_missing=server_artifacts.export_missing)
    with BackgroundServer(config, address="127.0.0.1:0") as running:
        yield running


CLIENT_SCRIPT = r"""
import asyncio, importlib.util, json, sys
import numpy as np
import loss_service
from loss_service.client import AsyncLossClient, LossClient

target, predictions_file, targets_file = sys.argv[1:]
predictions, targets = np.load(predictions_file), np.load(targets_file)
with LossClient(target, timeout=60) as client:
    result = client.score("focal", predictions, targets, gamma=2.0, reduction="none")
    names = [info.name for info in client.list_losses()]

async def async_score():
    async with AsyncLossClient(target, timeout=60) as client:
        return await client.score("focal", predictions, targets, gamma=2.0)

mean = asyncio.run(async_score()).loss
print(json.dumps({
    "package": loss_service.__file__, "values": result.values.tolist(), "mean": mean,
    "names": names, "torch_installed": importlib.util.find_spec("torch") is not None,
    "heavy_imported": sorted(name for name in ("torch", "onnx", "onnxruntime") if name in sys.modules),
}))
"""


@pytest.mark.slow
def test_a_venv_with_only_the_client_extra_scores_against_a_server(wheel, server, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--constraint", str(ROOT / "constraints.txt"), f"{wheel}[client]"],
        capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                            check=True, timeout=120)
    distributions = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert not distributions & set(HEAVY), sorted(distributions)

    generator = torch.Generator().manual_seed(3)
    predictions = torch.randn(6, 4, generator=generator)
    targets = torch.randint(0, 4, (6,), generator=generator)
    np.save(tmp_path / "p.npy", predictions.numpy())
    np.save(tmp_path / "t.npy", targets.numpy())
    # Outside the checkout and without PYTHONPATH: the venv's own copy of the package answers.
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "LOSS_SERVICE"))}
    run = subprocess.run([str(python), "-c", CLIENT_SCRIPT, server.target, str(tmp_path / "p.npy"),
                          str(tmp_path / "t.npy")], capture_output=True, text=True, cwd=tmp_path, env=environment,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["package"].startswith(str(venv))
    assert not report["torch_installed"] and report["heavy_imported"] == []
    focal = losses.build("focal", gamma=2.0, reduction="none")
    np.testing.assert_allclose(report["values"], focal(predictions, targets).numpy(), rtol=1e-6)
    assert report["mean"] == pytest.approx(float(focal(predictions, targets).mean()), rel=1e-6)
    assert set(report["names"]) == set(losses.names())

    command = subprocess.run([str(venv / "bin" / "loss-service"), "score", "--target", server.target, "--loss",
                              "focal", "--predictions", "p.npy", "--targets", "t.npy", "--param", "gamma=2.0"],
                             capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300)
    assert command.returncode == 0, command.stderr
    assert json.loads(command.stdout)["loss"] == pytest.approx(report["mean"], rel=1e-6)

    serve = subprocess.run([str(venv / "bin" / "loss-service"), "serve", "--port", "0"], capture_output=True,
                           text=True, cwd=tmp_path, env=environment, timeout=300)
    assert serve.returncode == 2 and "Traceback" not in serve.stderr
    assert "pip install 'loss-service[server]'" in json.loads(serve.stderr)["error"]
