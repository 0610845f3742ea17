r"""``python -m loss_service score|losses`` against an in-process server, and the argument parsing."""
import argparse
import json
import subprocess
import sys
import textwrap
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
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
        parse_param("gamma")


@pytest.fixture
def unreadable(tmp_path):
    r"""Paths that are no .npy file, with the reason the CLI gives for each."""
    (tmp_path / "text.npy").write_text("0.1 0.9\n")
    np.save(tmp_path / "whole.npy", np.zeros((4, 3), np.float32))
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:20])
    np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object))
    return {
        tmp_path / "missing.npy": "No such file or directory",
        tmp_path / "text.npy": "not a .npy file (numpy.save writes them)",
        tmp_path / "truncated.npy": "EOF",
        tmp_path / "objects.npy": "allow_pickle=False",
        tmp_path: "Is a directory",
    }


@pytest.mark.parametrize("flag", ["--predictions", "--targets", "--weights", "--param"])
def test_unreadable_files_get_one_line_under_the_score_usage(unreadable, flag, capsys):
    good = str(next(iter(unreadable)).with_name("whole.npy"))
    for path, reason in unreadable.items():
        arguments = {"--predictions": good, "--targets": good}
        arguments[flag] = f"alpha=@{path}" if flag == "--param" else str(path)
        with pytest.raises(SystemExit) as exit:
            main(["score", "--loss", "focal", *(item for pair in arguments.items() for item in pair)])
        assert exit.value.code == 2
        error = capsys.readouterr().err
        last = error.strip().splitlines()[-1]
        assert error.startswith("usage: loss-service score"), error
        assert last.startswith(f"loss-service score: error: argument {flag}: cannot read '{path}': ") and reason in last
        assert "Traceback" not in error


def test_a_param_without_a_value_shows_the_score_usage(files, capsys):
    paths, *_ = files
    with pytest.raises(SystemExit) as exit:
        main(["score", "--loss", "focal", "--predictions", str(paths["p"]), "--targets", str(paths["t"]),
              "--param", "gamma"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: loss-service score")
    assert error.strip().splitlines()[-1] == (
        "loss-service score: error: argument --param: expected NAME=VALUE (e.g. gamma=2), got 'gamma'")


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


def test_serve_takes_its_flags_from_the_server_and_its_help_loads_no_torch():
    code = textwrap.dedent("""
        import sys
        from loss_service.__main__ import main
        try:
            main(["serve", "--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        assert "torch" not in sys.modules, "torch was imported"
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: loss-service serve") and "--max-inflight-bytes" in result.stdout
    unknown = subprocess.run([sys.executable, "-m", "loss_service", "serve", "--no-such-flag"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unrecognized arguments: --no-such-flag" in unknown.stderr
