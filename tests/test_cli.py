r"""``python -m loss_service score|losses`` against an in-process server, and the argument parsing."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loss_service import losses
from loss_service.__main__ import main, parse_param
from loss_service.server import BackgroundServer, ServerConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(server_artifacts):
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), export_missing=server_artifacts.export_missing)
    with BackgroundServer(config, address="127.0.0.1:0") as running:
        yield running


@pytest.fixture
def files(tmp_path):
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randn(4, 3, 5, generator=generator)
    targets = torch.randint(0, 3, (4, 5), generator=generator)
    weights = torch.rand(4, generator=generator)
    paths = {}
    for name, tensor in (("p", predictions), ("t", targets), ("w", weights)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], tensor.numpy())
    np.save(tmp_path / "alpha.npy", np.array([0.2, 0.3, 0.5], np.float32))
    return paths, predictions, targets, weights


def test_parse_param():
    assert parse_param("gamma=2") == ("gamma", 2)
    assert parse_param("gamma=2.5") == ("gamma", 2.5)
    assert parse_param("include_background=false") == ("include_background", False)
    assert parse_param("mode=multiclass") == ("mode", "multiclass")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_param("gamma")


def test_score_prints_json(server, files, capsys, tmp_path):
    paths, predictions, targets, weights = files
    code = main(["score", "--target", server.target, "--loss", "focal", "--predictions", str(paths["p"]),
                 "--targets", str(paths["t"]), "--weights", str(paths["w"]), "--param", "gamma=3",
                 "--param", f"alpha=@{tmp_path / 'alpha.npy'}", "--reduction", "sum", "--backend", "torchscript",
                 "--per-sample", "--request-id", "cli-1"])
    assert code == 0
    output = json.loads(capsys.readouterr().out)
    expected = losses.build("focal", gamma=3.0, alpha=torch.tensor([0.2, 0.3, 0.5]), reduction="sum")(predictions, targets, weights)
    assert output["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert output["backend"] == "torchscript" and output["request_id"] == "cli-1" and len(output["per_sample"]) == 4
    assert output["values"] is None


def test_score_errors_print_the_status_and_violations(server, files, capsys):
    paths, *_ = files
    code = main(["score", "--target", server.target, "--loss", "focal", "--predictions", str(paths["p"]),
                 "--targets", str(paths["t"]), "--param", "gamma=-1"])
    assert code == 1
    error = json.loads(capsys.readouterr().err)
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["field_violations"][0]["field"] == "params.gamma"


def test_losses_lists_json(server, capsys):
    assert main(["losses", "--target", server.target]) == 0
    assert [entry["name"] for entry in json.loads(capsys.readouterr().out)] == losses.names()


def test_score_as_a_subprocess(server, files):
    paths, predictions, targets, _ = files
    result = subprocess.run(
        [sys.executable, "-m", "loss_service", "score", "--target", server.target, "--loss", "cross_entropy",
         "--predictions", str(paths["p"]), "--targets", str(paths["t"]), "--reduction", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    expected = losses.build("cross_entropy", reduction="none")(predictions, targets)
    np.testing.assert_allclose(output["values"], expected.numpy(), rtol=1e-5, atol=1e-6)
