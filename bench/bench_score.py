r"""Benchmark ``ScoreBatch`` against its transport floor and against in-process eager PyTorch.

Usage (from the repository root, venv active)::

    python bench/bench_score.py                 # full run, about 3-5 minutes on 2 cores
    python bench/bench_score.py --quick         # smoke run, under 30 s
    python bench/bench_score.py --sizes 1000 1000000 --repeats 7 --json /tmp/bench.json

One run starts three subprocesses on free 127.0.0.1 ports -- the real server
(``python -m loss_service serve --backend eager``), the bare server (:mod:`bench.bare_server`,
which only decodes the request into numpy arrays and sums them) and the loss floor (the bare
server computing the loss with the library's module and nothing else, ``--loss``; skipped with
``--no-floor``) -- and, for every workload and size, sends the *same serialized bytes* to each. The client sends pre-serialized requests, so
client-side encoding is not measured, and it runs in this process on the same machine.

Workloads (an *element* is one prediction element, so the rates of both losses compare):

* ``bce_with_logits+w``: logits ``(E/4, 4)`` float32, 0/1 targets float32 of the same shape, and an
  elementwise float32 weight map of the same shape (12 bytes per element on the wire);
* ``focal``: multi-class focal loss (gamma 2), logits ``(E/4, 4)`` float32 and ``E/4`` int64 class
  indices (6 bytes per element).

Both use ``reduction=mean``. Large requests: one request in flight, a warm-up call, then
``--repeats`` rounds in which the servers and eager PyTorch are each timed
once, in an order that rotates every round so that machine noise hits all three alike; the
median is reported as elements/s. Small requests (``--small-elements``, default 1e3): closed-loop
clients with 1 and 8 requests in flight for ``--small-seconds`` per round and server, alternating
servers over ``--rounds`` rounds; requests/s is completed requests over elapsed time, p50/p99 are
over all latencies of all rounds.

The targets (printed as PASS/FAIL, never asserted): for >= 1e6 elements, server elements/s at
least 0.8 of the bare server's; for small requests, requests/s at least 0.7 of the bare server's
and p50 latency at most 1.5x the bare server's.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np
import torch

if __package__ in (None, ""):
    # Run as a script (python bench/bench_score.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bare_server import message_options  # noqa: E402
from loss_service import losses  # noqa: E402
from loss_service.codec import to_message  # noqa: E402
from loss_service.server import tune_malloc  # noqa: E402
from loss_service.v1 import loss_service_pb2 as pb  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SCORE_BATCH = "/loss_service.v1.LossService/ScoreBatch"
# Both servers and the client accept messages this large: a 1e7-element weighted BCE request is
# 120 MB.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
DEFAULT_SERVER_COMMAND = "{python} -m loss_service serve --host 127.0.0.1 --port {port} --backend eager"
BARE_SERVER_COMMAND = "{python} -m bench.bare_server --host 127.0.0.1 --port {port}"
LOSS_FLOOR_COMMAND = BARE_SERVER_COMMAND + " --loss"

LARGE_TARGET = 0.8  # server/bare elements/s, for requests of >= LARGE_TARGET_MIN_ELEMENTS
LARGE_TARGET_MIN_ELEMENTS = 1_000_000
SMALL_RPS_TARGET = 0.7  # server/bare requests/s
SMALL_P50_TARGET = 1.5  # server/bare p50 latency
# The real server and eager PyTorch compute the same float32 loss; a larger relative difference
# means the benchmark is not measuring the computation it claims to.
AGREEMENT_RTOL = 1e-4

# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    r"""One loss configuration whose requests the benchmark sends.

    ``classes`` is the class dimension of the ``(E / classes, classes)`` predictions; an element
    count must be a multiple of it. ``index_targets`` selects int64 class indices of shape
    ``(E / classes,)`` instead of 0/1 float targets shaped like the predictions.
    """

    label: str
    loss: str
    params: Dict[str, float]
    classes: int
    index_targets: bool
    elementwise_weights: bool

    def arrays(self, elements: int, seed: int = 0) -> Dict[str, np.ndarray]:
        r"""Random valid inputs with ``elements`` prediction elements (``predictions``, ``targets``, ``weights``)."""
        if elements <= 0 or elements % self.classes:
            raise ValueError(f"elements must be a positive multiple of {self.classes} for {self.label}, got {elements}")
        rng = np.random.default_rng(seed)
        rows = elements // self.classes
        predictions = (rng.standard_normal((rows, self.classes), dtype=np.float32) * 3).astype(np.float32)
        out = {"predictions": predictions}
        if self.index_targets:
            out["targets"] = rng.integers(0, self.classes, size=rows, dtype=np.int64)
        else:
            out["targets"] = (rng.random((rows, self.classes), dtype=np.float32) < 0.3).astype(np.float32)
        if self.elementwise_weights:
            out["weights"] = rng.uniform(0.5, 2.0, size=(rows, self.classes)).astype(np.float32)
        return out

    def request(self, arrays: Dict[str, np.ndarray]) -> pb.ScoreBatchRequest:
        r"""The ``ScoreBatchRequest`` both servers receive for ``arrays``."""
        request = pb.ScoreBatchRequest(loss=self.loss, reduction=pb.REDUCTION_MEAN)
        for name, value in self.params.items():
            request.params[name].double_value = value
        for name, array in arrays.items():
            getattr(request, name).CopyFrom(to_message(array, name))
        return request

    def eager(self, arrays: Dict[str, np.ndarray]) -> Callable[[], float]:
        r"""A call computing the same loss in-process with ``losses.build`` on ready tensors."""
        module = losses.build(self.loss, **self.params)
        tensors = [torch.from_numpy(arrays["predictions"]), torch.from_numpy(arrays["targets"])]
        weights = torch.from_numpy(arrays["weights"]) if "weights" in arrays else None

        def run() -> float:
            with torch.inference_mode():
                return float(module(tensors[0], tensors[1], weights))

        return run


WORKLOADS: Tuple[Workload, ...] = (
    Workload("bce_with_logits+w", "bce_with_logits", {}, classes=4, index_targets=False, elementwise_weights=True),
    Workload("focal", "focal", {"gamma": 2.0}, classes=4, index_targets=True, elementwise_weights=False),
)


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    r"""A TCP port that is free on 127.0.0.1 right now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    r"""A server subprocess on a free port, ready when a small ``ScoreBatch`` request succeeds.

    ``command`` is a format string with ``{python}`` and ``{port}``; the process runs from the
    repository root with its output in a temporary log file (shown if it fails to start).
    """

    def __init__(self, name: str, command: str, ready_request: bytes, ready_timeout: float) -> None:
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.argv = shlex.split(command.format(python=shlex.quote(sys.executable), port=self.port))
        self.ready_request = ready_request
        self.ready_timeout = ready_timeout
        self.process: Optional[subprocess.Popen] = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(self.argv, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last_error = "no attempt"
        with grpc.insecure_channel(self.address, options=message_options(MAX_MESSAGE_BYTES)) as channel:
            call = channel.unary_unary(SCORE_BATCH)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} server exited with code {self.process.returncode}:\n{self.log_tail()}")
                try:
                    call(self.ready_request, timeout=5.0)
                    self._wait_background_exports(deadline)
                    return
                except grpc.RpcError as error:
                    # UNAVAILABLE while it binds or loads its backends; anything else is a real error.
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise RuntimeError(f"{self.name} server rejected the readiness request: "
                                           f"{error.code().name}: {error.details()}") from None
                    last_error = f"{error.code().name}: {error.details()}"
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} server not ready after {self.ready_timeout:.0f} s ({last_error}):\n{self.log_tail()}")

    def _wait_background_exports(self, deadline: float) -> None:
        r"""Wait until the real server's background ONNX exports have ended.

        After a fresh export (a new checkout, changed loss code) the server turns ready first and
        then exports its ONNX variants for a minute or two, one worker process at 100 % of a core:
        measuring meanwhile would time the exporter. The server logs ``pending_variants`` when its
        backends are loaded and ``background_export_finished`` at the end; a server that logs
        neither (another ``--server-command``) is not waited for.
        """
        announced = False
        while True:
            pending = 0
            finished = False
            for line in Path(self.log.name).read_text(errors="replace").splitlines():
                if '"event": "backends_loaded"' in line:
                    pending = json.loads(line).get("pending_variants", 0)
                finished = finished or '"event": "background_export_finished"' in line
            if not pending or finished:
                return
            if not announced:
                print(f"{self.name} server: waiting for its background export of {pending} ONNX variants ...", flush=True)
                announced = True
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server did not finish its background exports:\n{self.log_tail()}")
            time.sleep(1.0)

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


# ----------------------------------------------------------------------------- measurement

AsyncCall = Callable[[], Awaitable[Any]]
CpuClock = Callable[[], float]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_clock(pid: int) -> CpuClock:
    r"""Seconds of CPU (user + system, all threads) used so far by process ``pid``, from ``/proc``.

    CPU per request is far less disturbed than wall time by other work on the machine, so the
    tables report it next to the wall-clock figures (resolution: one clock tick, 10 ms; it is
    summed over many calls).
    """
    path = f"/proc/{pid}/stat"

    def clock() -> float:
        with open(path) as stat:
            # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    return clock


@dataclass(frozen=True)
class Subject:
    r"""One thing being timed: its call and, for a server process, the clock of its CPU time."""

    call: AsyncCall
    cpu: Optional[CpuClock] = None


def grpc_call(channel: grpc.aio.Channel, payload: bytes) -> AsyncCall:
    r"""An async call sending the pre-serialized ``payload`` and parsing the response."""
    stub = channel.unary_unary(SCORE_BATCH, response_deserializer=pb.ScoreBatchResponse.FromString)
    return lambda: stub(payload)


def eager_call(run: Callable[[], float]) -> AsyncCall:
    async def call() -> float:
        return run()

    return call


async def interleaved_medians(subjects: Dict[str, Subject], repeats: int) -> Dict[str, Tuple[float, Optional[float]]]:
    r"""``(median wall seconds, mean CPU seconds or None)`` per call of each subject.

    One warm-up call each, then ``repeats`` rounds that time each subject once; the order rotates
    by one every round so that no subject is always first after the client's own idle time or
    always right after the heaviest one.
    """
    for subject in subjects.values():
        await subject.call()
    names = list(subjects)
    times: Dict[str, List[float]] = {name: [] for name in names}
    cpu = {name: 0.0 for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            subject = subjects[name]
            cpu_start = subject.cpu() if subject.cpu else 0.0
            start = time.perf_counter()
            await subject.call()
            times[name].append(time.perf_counter() - start)
            cpu[name] += subject.cpu() - cpu_start if subject.cpu else 0.0
    return {
        name: (statistics.median(times[name]), cpu[name] / repeats if subjects[name].cpu else None) for name in names
    }


async def closed_loop(call: AsyncCall, in_flight: int, seconds: float) -> Tuple[int, float, List[float]]:
    r"""``in_flight`` workers sending requests back to back for ``seconds``.

    Returns ``(completed, elapsed_seconds, latencies)``.
    """
    latencies: List[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return len(latencies), time.perf_counter() - start, latencies


@dataclass
class SmallStats:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: Optional[float]  # CPU time of the server process per request


async def interleaved_small(subjects: Dict[str, Subject], in_flight: int, seconds: float, rounds: int) -> Dict[str, SmallStats]:
    r"""Closed-loop rates and latency percentiles, alternating the subjects every round."""
    for subject in subjects.values():
        await closed_loop(subject.call, in_flight, min(seconds, 0.2))
    names = list(subjects)
    completed = {name: 0 for name in names}
    elapsed = {name: 0.0 for name in names}
    cpu = {name: 0.0 for name in names}
    latencies: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            subject = subjects[name]
            cpu_start = subject.cpu() if subject.cpu else 0.0
            count, seconds_taken, values = await closed_loop(subject.call, in_flight, seconds)
            cpu[name] += subject.cpu() - cpu_start if subject.cpu else 0.0
            completed[name] += count
            elapsed[name] += seconds_taken
            latencies[name].extend(values)
    out = {}
    for name in names:
        p50, p99 = np.percentile(np.asarray(latencies[name]) * 1e3, [50, 99])
        cpu_ms = cpu[name] * 1e3 / completed[name] if subjects[name].cpu else None
        out[name] = SmallStats(completed[name] / elapsed[name], float(p50), float(p99), cpu_ms)
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class LargeRow:
    workload: str
    elements: int
    request_bytes: int
    server_seconds: float
    bare_seconds: float
    eager_seconds: float
    relative_difference: float  # |server loss - eager loss| / |eager loss|
    server_cpu_seconds: Optional[float] = None  # mean CPU time of the server process per request
    bare_cpu_seconds: Optional[float] = None
    floor_seconds: Optional[float] = None  # the loss floor (bare server + the library's loss)

    @property
    def ratio_floor(self) -> Optional[float]:
        return None if self.floor_seconds is None else self.floor_seconds / self.server_seconds

    @property
    def ratio_bare(self) -> float:
        return self.bare_seconds / self.server_seconds

    @property
    def ratio_eager(self) -> float:
        return self.eager_seconds / self.server_seconds

    def target(self) -> str:
        if self.elements < LARGE_TARGET_MIN_ELEMENTS:
            return "-"
        return "PASS" if self.ratio_bare >= LARGE_TARGET else "FAIL"


@dataclass
class SmallRow:
    workload: str
    elements: int
    in_flight: int
    server: SmallStats
    bare: SmallStats
    floor: Optional[SmallStats] = None  # the loss floor (bare server + the library's loss)

    @property
    def rps_ratio_floor(self) -> Optional[float]:
        return None if self.floor is None else self.server.requests_per_second / self.floor.requests_per_second

    @property
    def floor_rps_ratio(self) -> Optional[float]:
        return None if self.floor is None else self.floor.requests_per_second / self.bare.requests_per_second

    @property
    def rps_ratio(self) -> float:
        return self.server.requests_per_second / self.bare.requests_per_second

    @property
    def p50_ratio(self) -> float:
        return self.server.p50_ms / self.bare.p50_ms

    @property
    def p99_ratio(self) -> float:
        return self.server.p99_ms / self.bare.p99_ms

    def targets(self) -> Tuple[str, str]:
        return ("PASS" if self.rps_ratio >= SMALL_RPS_TARGET else "FAIL",
                "PASS" if self.p50_ratio <= SMALL_P50_TARGET else "FAIL")


@dataclass
class Results:
    large: List[LargeRow] = field(default_factory=list)
    small: List[SmallRow] = field(default_factory=list)


@dataclass(frozen=True)
class Endpoint:
    r"""A listening server: its channel and, if it is a separate process, its CPU clock."""

    channel: grpc.aio.Channel
    cpu: Optional[CpuClock] = None

    @staticmethod
    def subjects(endpoints: Dict[str, Optional["Endpoint"]], payload: bytes) -> Dict[str, Subject]:
        return {name: endpoint.subject(payload) for name, endpoint in endpoints.items() if endpoint is not None}

    def subject(self, payload: bytes) -> Subject:
        return Subject(grpc_call(self.channel, payload), self.cpu)


async def run_large(server: Endpoint, bare: Endpoint, workload: Workload, elements: int, repeats: int,
                    floor: Optional[Endpoint] = None) -> LargeRow:
    r"""Time one workload at one size on the servers and in-process eager."""
    arrays = workload.arrays(elements)
    payload = workload.request(arrays).SerializeToString()
    eager = workload.eager(arrays)
    server_subject = server.subject(payload)
    expected = eager()
    served = (await server_subject.call()).loss
    relative_difference = abs(served - expected) / max(abs(expected), 1e-30)
    if relative_difference > AGREEMENT_RTOL:
        raise RuntimeError(f"{workload.label} at {elements} elements: server loss {served!r} != eager loss {expected!r}")
    subjects = Endpoint.subjects({"server": server, "bare": bare, "floor": floor}, payload)
    measured = await interleaved_medians(dict(subjects, eager=Subject(eager_call(eager))), repeats)
    return LargeRow(
        workload.label, elements, len(payload), measured["server"][0], measured["bare"][0], measured["eager"][0],
        relative_difference, measured["server"][1], measured["bare"][1],
        measured["floor"][0] if floor is not None else None,
    )


async def run_small(server: Endpoint, bare: Endpoint, workload: Workload, elements: int,
                    in_flight: int, seconds: float, rounds: int, floor: Optional[Endpoint] = None) -> SmallRow:
    r"""Requests/s and latency percentiles of small requests, server vs bare (and the loss floor)."""
    payload = workload.request(workload.arrays(elements)).SerializeToString()
    subjects = Endpoint.subjects({"server": server, "bare": bare, "floor": floor}, payload)
    stats = await interleaved_small(subjects, in_flight, seconds, rounds)
    return SmallRow(workload.label, elements, in_flight, stats["server"], stats["bare"], stats.get("floor"))


async def run_all(server_address: str, bare_address: str, workloads: Sequence[Workload], sizes: Sequence[int],
                  repeats: int, small_elements: int, in_flights: Sequence[int], small_seconds: float, rounds: int,
                  server_cpu: Optional[CpuClock] = None, bare_cpu: Optional[CpuClock] = None,
                  progress: Callable[[str], None] = lambda line: None, floor_address: Optional[str] = None,
                  floor_cpu: Optional[CpuClock] = None) -> Results:
    r"""Every large and small measurement against servers already listening on the addresses given."""
    options = message_options(MAX_MESSAGE_BYTES)
    results = Results()
    async with contextlib.AsyncExitStack() as channels:
        server, bare, floor = [
            None if address is None else Endpoint(
                await channels.enter_async_context(grpc.aio.insecure_channel(address, options=options)), cpu)
            for address, cpu in ((server_address, server_cpu), (bare_address, bare_cpu), (floor_address, floor_cpu))
        ]
        for workload in workloads:
            for elements in sizes:
                row = await run_large(server, bare, workload, elements, repeats, floor)
                results.large.append(row)
                progress(f"{workload.label} {elements:.0e}: server/bare {row.ratio_bare:.2f}")
        for workload in workloads:
            for in_flight in in_flights:
                row = await run_small(server, bare, workload, small_elements, in_flight, small_seconds, rounds, floor)
                results.small.append(row)
                progress(f"{workload.label} small x{in_flight}: req/s ratio {row.rps_ratio:.2f}")
    return results


# ----------------------------------------------------------------------------- report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["| " + " | ".join(str(c).rjust(w) for c, w in zip(line, widths)) + " |" for line in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def format_results(results: Results) -> str:
    r"""The two Markdown tables (large requests, small requests) with ratios and PASS/FAIL.

    Columns of the loss floor appear when it was measured.
    """
    large_floor = any(r.floor_seconds is not None for r in results.large)
    large = _table(
        ["loss", "elements", "MB", "server ms", "bare ms", "eager ms", "server Mel/s", "bare Mel/s",
         "eager Mel/s", "server/bare", "server/eager", f">= {LARGE_TARGET} bare", "server CPU ms", "bare CPU ms"]
        + (["floor ms", "server/floor"] if large_floor else []),
        [[r.workload, f"{r.elements:.0e}", f"{r.request_bytes / 1e6:.3g}", f"{r.server_seconds * 1e3:.3g}",
          f"{r.bare_seconds * 1e3:.3g}", f"{r.eager_seconds * 1e3:.3g}", f"{r.elements / r.server_seconds / 1e6:.3g}",
          f"{r.elements / r.bare_seconds / 1e6:.3g}", f"{r.elements / r.eager_seconds / 1e6:.3g}",
          f"{r.ratio_bare:.2f}", f"{r.ratio_eager:.3f}", r.target(), _ms(r.server_cpu_seconds), _ms(r.bare_cpu_seconds)]
         + ([_ms(r.floor_seconds), _ratio(r.ratio_floor)] if large_floor else [])
         for r in results.large],
    )
    small_floor = any(r.floor is not None for r in results.small)
    small = _table(
        ["loss", "elements", "in flight", "server req/s", "bare req/s", "req/s ratio", f">= {SMALL_RPS_TARGET}",
         "server p50 ms", "bare p50 ms", "p50 ratio", f"<= {SMALL_P50_TARGET}", "server p99 ms", "bare p99 ms",
         "p99 ratio", "server CPU ms/req", "bare CPU ms/req"]
        + (["floor req/s", "floor p50 ms", "floor/bare req/s", "server/floor req/s", "floor CPU ms/req"]
           if small_floor else []),
        [[r.workload, f"{r.elements:.0e}", str(r.in_flight), f"{r.server.requests_per_second:.0f}",
          f"{r.bare.requests_per_second:.0f}", f"{r.rps_ratio:.2f}", r.targets()[0], f"{r.server.p50_ms:.3g}",
          f"{r.bare.p50_ms:.3g}", f"{r.p50_ratio:.2f}", r.targets()[1], f"{r.server.p99_ms:.3g}",
          f"{r.bare.p99_ms:.3g}", f"{r.p99_ratio:.2f}", _ms(r.server.cpu_ms_per_request, 1e-3),
          _ms(r.bare.cpu_ms_per_request, 1e-3)]
         + (_small_floor_cells(r) if small_floor else [])
         for r in results.small],
    )
    return (f"Large requests (one in flight, median wall time; Mel/s = million prediction elements per second; "
            f"CPU = mean CPU time of the server process per request; floor = the bare server computing the loss "
            f"with the library, nothing else):\n\n{large}\n\n"
            f"Small requests (closed loop; CPU ms/req = server process CPU time per request):\n\n{small}\n")


def _small_floor_cells(row: SmallRow) -> List[str]:
    if row.floor is None:
        return ["-"] * 5
    return [f"{row.floor.requests_per_second:.0f}", f"{row.floor.p50_ms:.3g}", _ratio(row.floor_rps_ratio),
            _ratio(row.rps_ratio_floor), _ms(row.floor.cpu_ms_per_request, 1e-3)]


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ms(seconds: Optional[float], scale: float = 1.0) -> str:
    return "-" if seconds is None else f"{seconds * scale * 1e3:.3g}"


def results_json(results: Results) -> Dict[str, Any]:
    return {
        "large": [dict(asdict(r), ratio_bare=r.ratio_bare, ratio_eager=r.ratio_eager, ratio_floor=r.ratio_floor,
                       target=r.target()) for r in results.large],
        "small": [dict(asdict(r), rps_ratio=r.rps_ratio, p50_ratio=r.p50_ratio, p99_ratio=r.p99_ratio,
                       rps_ratio_floor=r.rps_ratio_floor, floor_rps_ratio=r.floor_rps_ratio,
                       targets=list(r.targets())) for r in results.small],
    }


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model}); Python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"grpcio {grpc.__version__}, numpy {np.__version__}; torch threads in the client {torch.get_num_threads()}")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark ScoreBatch against the bare gRPC floor and eager PyTorch.")
    parser.add_argument("--quick", action="store_true", help="small sizes and short windows (under 30 s)")
    parser.add_argument("--sizes", type=float, nargs="+", help="prediction elements per large request (default 1e3 1e5 1e6 1e7)")
    parser.add_argument("--repeats", type=int, help="timed rounds per size (default 5; --quick 3)")
    parser.add_argument("--small-elements", type=float, default=1e3, help="elements per small request (default 1e3)")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8], help="concurrent small requests (default 1 8)")
    parser.add_argument("--small-seconds", type=float, help="seconds per server per round of small requests (default 2; --quick 0.4)")
    parser.add_argument("--rounds", type=int, help="alternating rounds of small requests (default 3; --quick 2)")
    parser.add_argument("--loss", choices=[w.label for w in WORKLOADS], nargs="+", help="workloads (default all)")
    parser.add_argument("--server-command", default=DEFAULT_SERVER_COMMAND,
                        help="command starting the real server; {python} and {port} are substituted "
                             f"(default: {DEFAULT_SERVER_COMMAND!r})")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for the servers to answer (the real server's first start exports "
                             "its artifacts, minutes on 2 cores; later starts take seconds)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the loss floor (the bare server computing the loss with the library, "
                             "bench/bare_server.py --loss)")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ([1e3, 1e5, 1e6] if args.quick else [1e3, 1e5, 1e6, 1e7]))]
    args.small_elements = int(args.small_elements)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.small_seconds = args.small_seconds or (0.4 if args.quick else 2.0)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.repeats < 1 or args.rounds < 1 or args.small_seconds <= 0:
        parser.error("--repeats and --rounds must be >= 1 and --small-seconds > 0")
    if min(args.in_flight) < 1:
        parser.error("--in-flight values must be >= 1")
    args.workloads = [w for w in WORKLOADS if args.loss is None or w.label in args.loss]
    for workload in args.workloads:
        for elements in [*args.sizes, args.small_elements]:
            if elements <= 0 or elements % workload.classes:
                parser.error(f"element counts must be positive multiples of {workload.classes} "
                             f"(the class count of {workload.label}), got {elements}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Results:
    args = parse_args(argv)
    started = time.monotonic()
    ready_request = WORKLOADS[0].request(WORKLOADS[0].arrays(WORKLOADS[0].classes)).SerializeToString()
    print(machine_description(), flush=True)
    print("starting the servers (the real one exports missing artifacts first) ...", flush=True)
    with contextlib.ExitStack() as processes:
        server, bare = (
            processes.enter_context(ServerProcess(name, command, ready_request, args.ready_timeout))
            for name, command in (("real", args.server_command), ("bare", BARE_SERVER_COMMAND))
        )
        floor = None if args.no_floor else processes.enter_context(
            ServerProcess("loss floor", LOSS_FLOOR_COMMAND, ready_request, args.ready_timeout))
        print(f"real server: {' '.join(server.argv)}\nbare server: {' '.join(bare.argv)}", flush=True)
        if floor is not None:
            print(f"loss floor: {' '.join(floor.argv)}", flush=True)
        results = asyncio.run(run_all(
            server.address, bare.address, args.workloads, args.sizes, args.repeats, args.small_elements,
            args.in_flight, args.small_seconds, args.rounds, process_cpu_clock(server.process.pid),
            process_cpu_clock(bare.process.pid), progress=lambda line: print("  " + line, flush=True),
            floor_address=None if floor is None else floor.address,
            floor_cpu=None if floor is None else process_cpu_clock(floor.process.pid),
        ))
    print()
    print(format_results(results))
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(results_json(results), indent=2))
    return results


if __name__ == "__main__":
    # The client's cost is common to both servers and only dilutes their ratio: its 120 MB sends
    # get the servers' allocator setting too, and so does eager PyTorch, timed in this process.
    # (Only when run as a script: importing the module must not change the importer's malloc.)
    tune_malloc()
    main()
