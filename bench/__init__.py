r"""Benchmarks of the gRPC ``LossService`` against its transport floor and in-process eager PyTorch.

* :mod:`bench.bare_server` -- the floor: a ``LossService`` whose ``ScoreBatch`` only decodes the
  request's tensors into numpy arrays and sums them.
* :mod:`bench.bench_score` -- ``python bench/bench_score.py``: starts the real and the bare server
  as subprocesses and prints elements/s, requests/s, latency percentiles and their ratios.

Results and the command are recorded in ``docs/benchmarks.md``.
"""
