r"""Smoke tests of bench/: every code path of the benchmark on tiny sizes, no timing assertions."""
import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bench import bare_server, bench_score
from loss_service import losses
from loss_service.v1 import loss_service_pb2 as pb

pytestmark = pytest.mark.timeout(300)


def _with_bare_server(body):
    r"""Run ``await body(address)`` against an in-process bare server on a free port."""

    async def run():
        server, port = await bare_server.start_bare_server("127.0.0.1:0", bare_server.message_options(1 << 20))
        try:
            return await body(f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    return asyncio.run(run())


@pytest.mark.parametrize("workload", bench_score.WORKLOADS, ids=lambda w: w.label)
def test_workload_request_carries_the_arrays(workload):
    arrays = workload.arrays(40, seed=3)
    assert arrays["predictions"].shape == (10, workload.classes)
    assert arrays["predictions"].dtype == np.float32
    request = pb.ScoreBatchRequest.FromString(workload.request(arrays).SerializeToString())
    assert request.loss == workload.loss
    assert request.reduction == pb.REDUCTION_MEAN
    assert {name: p.double_value for name, p in request.params.items()} == workload.params
    for name, array in arrays.items():
        np.testing.assert_array_equal(bare_server.decode(getattr(request, name), name), array)
    assert request.HasField("weights") == workload.elementwise_weights
    assert math.isfinite(workload.eager(arrays)())


def test_weighted_bce_workload_is_torch_weighted_bce():
    workload = bench_score.WORKLOADS[0]
    arrays = workload.arrays(400, seed=1)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(arrays["predictions"]), torch.from_numpy(arrays["targets"]),
        weight=torch.from_numpy(arrays["weights"]),
    )
    assert workload.eager(arrays)() == pytest.approx(float(expected), rel=1e-6)


def test_workload_rejects_counts_that_are_not_multiples_of_the_classes():
    with pytest.raises(ValueError, match="multiple of 4"):
        bench_score.WORKLOADS[0].arrays(10)
    with pytest.raises(SystemExit):
        bench_score.parse_args(["--sizes", "1001"])


def test_bare_server_sums_the_decoded_tensors_and_names_bad_fields():
    workload = bench_score.WORKLOADS[0]
    arrays = workload.arrays(40, seed=2)
    request = workload.request(arrays)
    bad = pb.ScoreBatchRequest()
    bad.CopyFrom(request)
    bad.targets.data = bad.targets.data[:-4]

    async def body(address):
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(bench_score.SCORE_BATCH, response_deserializer=pb.ScoreBatchResponse.FromString)
            response = await call(request.SerializeToString())
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call(bad.SerializeToString())
            return response, error.value

    response, error = _with_bare_server(body)
    expected = sum(float(a.astype(np.float64).sum()) for a in arrays.values())
    assert response.loss == pytest.approx(expected, rel=1e-5)
    assert response.num_elements == 40
    assert response.backend == "bare"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "targets.data" in error.details()


@pytest.mark.parametrize("workload", bench_score.WORKLOADS, ids=lambda w: w.label)
def test_loss_floor_answers_the_librarys_loss(workload):
    arrays = workload.arrays(40, seed=4)
    request = workload.request(arrays)
    request.reduction = pb.REDUCTION_SUM
    floor = bare_server.LossFloor()
    assert floor(request).loss == pytest.approx(_library_loss(workload, arrays, "sum"), rel=1e-6)
    request.reduction = pb.REDUCTION_MEAN
    response = floor(request)
    assert response.loss == pytest.approx(workload.eager(arrays)(), rel=1e-6)
    assert response.backend == "bare+loss" and response.num_elements == 40


def _library_loss(workload, arrays, reduction):
    module = losses.build(workload.loss, reduction=reduction, **workload.params)
    weights = torch.from_numpy(arrays["weights"]) if "weights" in arrays else None
    return float(module(torch.from_numpy(arrays["predictions"]), torch.from_numpy(arrays["targets"]), weights))


def test_loss_floor_server_serves_the_loss():
    workload = bench_score.WORKLOADS[1]
    arrays = workload.arrays(40, seed=5)

    async def body():
        server, port = await bare_server.start_bare_server("127.0.0.1:0", bare_server.message_options(1 << 20), loss=True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(bench_score.SCORE_BATCH, response_deserializer=pb.ScoreBatchResponse.FromString)
                return await call(workload.request(arrays).SerializeToString())
        finally:
            await server.stop(None)

    assert asyncio.run(body()).loss == pytest.approx(workload.eager(arrays)(), rel=1e-6)


def test_measurements_and_report_against_in_process_servers():
    # The bare server stands in for both servers: this checks the measuring and reporting code.
    workload = bench_score.WORKLOADS[0]
    payload = workload.request(workload.arrays(8)).SerializeToString()

    async def body(address):
        async with grpc.aio.insecure_channel(address) as channel:
            # This process's CPU clock stands in for the server process's.
            subjects = {
                "server": bench_score.Subject(bench_score.grpc_call(channel, payload), bench_score.process_cpu_clock(os.getpid())),
                "bare": bench_score.Subject(bench_score.grpc_call(channel, payload)),
            }
            medians = await bench_score.interleaved_medians(subjects, repeats=2)
            small = await bench_score.interleaved_small(subjects, in_flight=2, seconds=0.05, rounds=2)
            return medians, small

    medians, small = _with_bare_server(body)
    assert set(medians) == {"server", "bare"} and all(wall > 0 for wall, _ in medians.values())
    assert medians["server"][1] >= 0 and medians["bare"][1] is None
    assert all(s.requests_per_second > 0 and 0 < s.p50_ms <= s.p99_ms for s in small.values())
    assert small["server"].cpu_ms_per_request > 0 and small["bare"].cpu_ms_per_request is None
    results = bench_score.Results(
        large=[bench_score.LargeRow("x", 2_000_000, 1, 2.0, 1.0, 0.5, 0.0)],
        small=[bench_score.SmallRow("x", 1000, 8, small["server"], small["bare"])],
    )
    assert results.large[0].ratio_bare == 0.5 and results.large[0].target() == "FAIL"
    text = bench_score.format_results(results)
    assert "2e+06 |" in text and " 0.50 |" in text and "FAIL" in text
    assert "server CPU ms/req" in text and "floor" not in text.split("\n\n", 1)[1]
    assert bench_score.results_json(results)["large"][0]["ratio_eager"] == 0.25
    # With the loss floor measured, its columns and ratios appear.
    floored = bench_score.Results(
        large=[bench_score.LargeRow("x", 2_000_000, 1, 2.0, 1.0, 0.5, 0.0, floor_seconds=1.6)],
        small=[bench_score.SmallRow("x", 1000, 8, small["server"], small["bare"], small["bare"])],
    )
    assert floored.large[0].ratio_floor == pytest.approx(0.8)
    assert floored.small[0].floor_rps_ratio == 1.0
    text = bench_score.format_results(floored)
    assert "server/floor" in text and "server/floor req/s" in text and " 0.80 |" in text
    assert bench_score.results_json(floored)["small"][0]["floor_rps_ratio"] == 1.0


@pytest.mark.slow  # starts the real server (on the session's exported artifacts) and the bare one
def test_full_benchmark_on_tiny_sizes_with_both_server_subprocesses(capsys, server_artifacts):
    # --no-export: the session's artifacts hold the default graphs only, and the bench would wait for
    # the background export of every variant (test_the_bench_waits_for_announced_background_exports).
    server_command = f"{bench_score.DEFAULT_SERVER_COMMAND} --artifacts {server_artifacts.folder} --no-export"
    results = bench_score.main([
        "--sizes", "40", "400", "--repeats", "1", "--small-elements", "40", "--in-flight", "1", "2",
        "--small-seconds", "0.05", "--rounds", "1", "--server-command", server_command,
    ])
    assert [(r.workload, r.elements) for r in results.large] == [
        (w.label, n) for w in bench_score.WORKLOADS for n in (40, 400)
    ]
    assert [(r.workload, r.in_flight) for r in results.small] == [
        (w.label, k) for w in bench_score.WORKLOADS for k in (1, 2)
    ]
    # The real server computed the same loss as eager PyTorch (main raises otherwise).
    assert all(r.relative_difference <= bench_score.AGREEMENT_RTOL for r in results.large)
    assert all(r.floor_seconds > 0 for r in results.large) and all(r.floor is not None for r in results.small)
    output = capsys.readouterr().out
    assert "Large requests" in output and "Small requests" in output


@pytest.mark.slow  # starts two real servers
def test_ab_comparison_of_two_server_commands(capsys, server_artifacts):
    from bench import bench_ab

    command = f"{bench_score.DEFAULT_SERVER_COMMAND} --artifacts {server_artifacts.folder} --no-export"
    rows = bench_ab.main(["--a", command, "--b", command, "--elements", "40", "--in-flight", "1",
                          "--seconds", "0.05", "--rounds", "1"])
    assert [row[:3] for row in rows] == [[w.label, "4e+01", "1"] for w in bench_score.WORKLOADS]
    assert all(float(row[5]) > 0 and float(row[11]) > 0 for row in rows)  # B/A requests/s and CPU
    assert "B/A req/s: median" in capsys.readouterr().out


@pytest.mark.slow  # starts a real server
def test_memory_per_request_byte_of_one_workload(capsys, server_artifacts):
    from bench import bench_memory

    factors = bench_memory.main(["--elements", "4e4", "--artifacts", str(server_artifacts.folder),
                                 "--workloads", "focal"])
    assert list(factors) == ["focal"] and factors["focal"] >= 0
    assert "| focal |" in capsys.readouterr().out


def test_the_bench_waits_for_announced_background_exports():
    servers = [bench_score.ServerProcess("real", "{python} -c pass", b"", ready_timeout=30) for _ in range(2)]
    for server in servers:
        server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    waiting, stuck = servers
    try:
        def write(server, line: str) -> None:
            server.log.write(line.encode() + b"\n")
            server.log.flush()

        write(waiting, json.dumps({"event": "backends_loaded", "pending_variants": 0}))
        started = time.monotonic()
        waiting._wait_background_exports(started + 20)  # nothing pending: returns at once
        assert time.monotonic() - started < 0.5
        write(waiting, json.dumps({"event": "backends_loaded", "pending_variants": 3}))
        finisher = threading.Timer(1.5, write, [waiting, json.dumps({"event": "background_export_finished"})])
        finisher.start()
        waiting._wait_background_exports(time.monotonic() + 20)
        assert time.monotonic() - started >= 1.4
        write(stuck, json.dumps({"event": "backends_loaded", "pending_variants": 3}))
        with pytest.raises(RuntimeError, match="did not finish its background exports"):
            stuck._wait_background_exports(time.monotonic() - 1)
    finally:
        for server in servers:
            server.stop()


def test_kernel_bench_times_every_eager_form_against_its_export_form(capsys):
    from bench import bench_kernels

    assert bench_kernels.main(["--forms", "--sizes", "40", "--repeats", "1", "--no-tune-malloc"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "4e+01" in line]
    assert len(rows) == len(bench_kernels.FORM_SITES)
    assert all(float(row.split("|")[-2]) > 0 for row in rows)  # export / eager


def test_kernel_bench_table_of_modules_against_torch(capsys):
    from bench import bench_kernels

    assert bench_kernels.main(["--sizes", "40", "--repeats", "1", "--only", "focal+w", "--no-tune-malloc"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "focal+w |" in line]
    assert len(rows) == 1 and float(rows[0].split("|")[-2]) > 0  # statistics / torch


def test_kernel_bench_compares_every_loss_with_another_checkout(capsys):
    from bench import bench_kernels

    root = str(Path(__file__).resolve().parent.parent)
    assert bench_kernels.main(["--against", root, "--repeats", "1", "--no-tune-malloc"]) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if line.count("|") == 4 and "loss" not in line]
    assert [line.split("|")[1].strip() for line in summary if not line.startswith("|---")] == losses.names()
    with pytest.raises(SystemExit):
        bench_kernels.main(["--against", root, "--sizes", "1000"])
    assert "--sizes does not apply" in capsys.readouterr().err


def test_peer_bench_times_every_loss_with_a_peer_after_checking_they_agree(tmp_path, capsys):
    from bench import bench_peers

    found, missing = bench_peers.cases()
    assert missing == []  # the test extra installs every peer
    # focal_tversky has no peer: smp raises the mean Tversky loss to the power, not each class's.
    assert {case.loss for case in found} == set(losses.names()) - {"focal_tversky"}
    out = tmp_path / "peers.json"
    assert bench_peers.main(["--sizes", "4096", "--threads", "1", "--repeats", "1", "--no-compiled", "--no-memory",
                             "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [row["case"] for row in results] == [case.name for case in found]
    for row in results:
        assert set(row["times_ms"]) == {"ours"} | set(next(c for c in found if c.name == row["case"]).peers)
        assert all(ratio > 0 for ratio in row["ours_over_peer"].values())
        assert row["float32_relative_error"]["ours"] < 1e-5
    assert len([line for line in capsys.readouterr().out.splitlines() if "| 4e+03 | 1 |" in line]) == len(found)


def test_peer_bench_profiles_the_top_level_ops_of_each_implementation(tmp_path, capsys):
    from bench import bench_peers

    out = tmp_path / "ops.json"
    assert bench_peers.main(["--ops", "--sizes", "4096", "--cases", "mse", "dice multiclass (MONAI)", "--json",
                             str(out)]) == 0
    rows = {(row["case"], row["implementation"]): row for row in json.loads(out.read_text())}
    assert set(rows) == {("mse", "ours"), ("mse", "F"), ("dice multiclass (MONAI)", "ours"),
                         ("dice multiclass (MONAI)", "MONAI")}
    # A region loss is a chain of ops in both libraries; F.mse_loss is torch's one fused op (and its broadcast).
    assert all(rows[(case, name)]["fwd_ops"] > 10 for case, name in rows if case != "mse")
    assert 1 <= rows[("mse", "F")]["fwd_ops"] <= 2
    for row in rows.values():
        assert row["fwd+bwd_ops"] > row["fwd_ops"], row  # the backward's nodes
        assert row["fwd_us"] > 0 and row["fwd+bwd_us"] > 0, row
    assert "| dice multiclass (MONAI) | 4e+03 | ours | " in capsys.readouterr().out


def test_peer_bench_median_of_runs_takes_every_ratio_timed_in_all_of_them(tmp_path, capsys):
    from bench import bench_peers

    def run(fwd, both, extra_case=False, memory=100):
        rows = [{"case": "mse", "elements": 10_000, "threads": 1, "times_ms": {},
                 "ours_over_peer": {"fwd": fwd, "fwd+bwd": both}}]
        if extra_case:
            rows.append({"case": "new", "elements": 10_000, "threads": 1, "times_ms": {},
                         "ours_over_peer": {"fwd": 0.1, "fwd+bwd": 0.1}})
        rows.append({"case": "mse", "memory_elements": 10_000_000, "peak_bytes": {"ours": memory, "F": 100}})
        return rows

    paths = []
    for index, args in enumerate([(0.9, 1.2, False, 110), (1.1, 1.3, True, 90), (0.8, 0.7, True, 100)]):
        paths.append(tmp_path / f"run{index}.json")
        paths[-1].write_text(json.dumps(run(*args)))
    assert bench_peers.main(["--median", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "| mse | 1e+04 | 1 | **0.90** (0.90 / 1.10 / 0.80) | **1.20** (1.20 / 1.30 / 0.70) |" in out
    assert "| new |" not in out  # timed in two of the three runs only
    assert "| ~1e4 | 1 of 1 | 0 of 1 |" in out and "| mse | **1.00** (1.10 / 0.90 / 1.00) |" in out


def test_peer_bench_stops_when_a_peer_computes_something_else():
    from bench import bench_peers

    case = bench_peers.Case("mse", "mse", {}, bench_peers.real_rows, {"wrong": torch.nn.functional.l1_loss})
    found, _ = bench_peers.implementations(case, compiled=False)
    with pytest.raises(SystemExit, match="wrong gives .* in float64"):
        bench_peers.check_agreement(case, found, case.inputs(64, torch.Generator().manual_seed(0)))


def test_peer_bench_measures_peak_memory_in_a_child_process():
    from bench import bench_peers

    peak = bench_peers.peak_memory("mse", "ours", 1_000_000)
    # One forward+backward of mse on 1e6 float32 elements keeps at least its 4 MB gradient.
    assert peak is not None and 4e6 <= peak < 2e8
