r"""Two builds of the server side by side: small-request throughput, latency and CPU per request.

Usage (from the repository root, venv active)::

    python bench/bench_ab.py --a "{python} -m loss_service serve --host 127.0.0.1 --port {port} --artifacts A" \
                             --b "{python} -m loss_service serve --host 127.0.0.1 --port {port} --artifacts B"

``--a`` and ``--b`` start the two servers (``{python}`` and ``{port}`` are substituted; run another
checkout with ``sh -c "cd ../other && exec {python} -m loss_service serve ..."``). For every
workload of :mod:`bench.bench_score` and every ``--in-flight`` count, closed-loop clients send the
same serialized small request to A and B in alternating rounds (the order flips every round), so
machine noise hits both alike; the table gives requests/s, p50 and the servers' CPU per request,
and B's ratios to A. Used to measure what a change costs (docs/benchmarks.md, "Hardening").
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import grpc

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bare_server import message_options  # noqa: E402
from bench.bench_score import (  # noqa: E402
    MAX_MESSAGE_BYTES, WORKLOADS, Endpoint, ServerProcess, _table, interleaved_small, machine_description,
    process_cpu_clock,
)

SERVERS = ("A", "B")


async def measure(addresses: Dict[str, str], cpus: Dict[str, object], elements: int, in_flights: Sequence[int],
                  seconds: float, rounds: int) -> List[List[str]]:
    rows = []
    options = message_options(MAX_MESSAGE_BYTES)
    async with contextlib.AsyncExitStack() as channels:
        endpoints = {name: Endpoint(await channels.enter_async_context(grpc.aio.insecure_channel(address, options=options)),
                                    cpus[name])
                     for name, address in addresses.items()}
        for workload in WORKLOADS:
            payload = workload.request(workload.arrays(elements)).SerializeToString()
            answers = {name: (await endpoint.subject(payload).call()).loss for name, endpoint in endpoints.items()}
            if abs(answers["A"] - answers["B"]) > 1e-6 * abs(answers["A"]):
                raise RuntimeError(f"{workload.label}: A answers {answers['A']!r}, B {answers['B']!r}")
            for in_flight in in_flights:
                stats = await interleaved_small(Endpoint.subjects(endpoints, payload), in_flight, seconds, rounds)
                a, b = stats["A"], stats["B"]
                rows.append([workload.label, f"{elements:.0e}", str(in_flight),
                             f"{a.requests_per_second:.0f}", f"{b.requests_per_second:.0f}",
                             f"{b.requests_per_second / a.requests_per_second:.3f}",
                             f"{a.p50_ms:.3f}", f"{b.p50_ms:.3f}", f"{b.p50_ms / a.p50_ms:.3f}",
                             f"{a.cpu_ms_per_request:.3f}", f"{b.cpu_ms_per_request:.3f}",
                             f"{b.cpu_ms_per_request / a.cpu_ms_per_request:.3f}"])
                print("  " + " ".join(rows[-1]), flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[List[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="command starting server A ({python}, {port})")
    parser.add_argument("--b", required=True, help="command starting server B ({python}, {port})")
    parser.add_argument("--elements", type=float, default=1e3, help="prediction elements per request (default 1e3)")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8], help="concurrent requests (default 1 8)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per server per round (default 2)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    ready = WORKLOADS[0].request(WORKLOADS[0].arrays(WORKLOADS[0].classes)).SerializeToString()
    print(machine_description(), flush=True)
    with contextlib.ExitStack() as processes:
        servers = {name: processes.enter_context(ServerProcess(name, command, ready, args.ready_timeout))
                   for name, command in zip(SERVERS, (args.a, args.b))}
        for name, server in servers.items():
            print(f"{name}: {' '.join(server.argv)}", flush=True)
        rows = asyncio.run(measure({name: s.address for name, s in servers.items()},
                                   {name: process_cpu_clock(s.process.pid) for name, s in servers.items()},
                                   int(args.elements), args.in_flight, args.seconds, args.rounds))
    print()
    print(_table(["loss", "elements", "in flight", "A req/s", "B req/s", "B/A req/s", "A p50 ms", "B p50 ms",
                  "B/A p50", "A CPU ms/req", "B CPU ms/req", "B/A CPU"], rows))
    ratios = [float(row[5]) for row in rows]
    print(f"B/A req/s: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    return rows


if __name__ == "__main__":
    main()
