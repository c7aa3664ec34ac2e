"""Shared machinery of the benchmark suites (pytest-benchmark): interleaved groups, the summary.

Every group compares providers, so the providers of a group are timed in the same rounds
(:class:`Interleaved`): pytest runs one test at a time, and pytest-benchmark would time each
provider's rounds back to back, minutes apart from the others', each in its own spell of a
shared machine's load. The first test of a group builds every provider of the group that the
session runs and times them round by round; each provider's test then hands its own times to
pytest-benchmark (:func:`replay`), whose tables and JSON show them as usual.

Every suite reports ``benchmark.extra_info["GB/s"]``: the kernel suites from the bytes any
implementation must move (the same for every provider, an effective rate), the block and model
suites from each provider's own bytes by :mod:`fusedres.traffic`.

- ``FUSEDRES_DEVICE_PEAKS``: a JSON file ``{"copy_GBps": .., "matmul_TFLOPs": ..}`` measured on
  this device (scripts/gpu_validate.sh writes one); GB/s and TFLOP/s are then also reported as
  fractions of those peaks.
- ``FUSEDRES_BENCH_LOG``: a file to which every finished case appends one JSON line (group,
  name, statistics, extra_info), so a run cut short by a timeout keeps what it measured
  (pytest-benchmark writes ``--benchmark-json`` only at the end).

Last, after pytest-benchmark's tables and pytest's short summary, the terminal summary prints
per group each provider's median, spread, GB/s, images/s and ratios to eager and to
torch.compile with their ranges, and lists the ratios that are not results
(:func:`fusedres.report.format_bench_cases`). Before any timing glibc is told to keep freed
memory (:func:`fusedres.report.keep_freed_memory`).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from fusedres.report import (format_bench_cases, keep_freed_memory, machine_info, summarize,
                             time_interleaved)

#: Whether glibc was told to keep freed memory (recorded in each benchmark's extra_info).
MALLOC_TUNED = keep_freed_memory()
#: Every timed case of this session, as logged to FUSEDRES_BENCH_LOG (for the terminal summary).
TIMED_CASES: list = []
#: The CPU model, its load and the software versions (printed with the summary).
MACHINE = machine_info(torch.device("cpu"))


def sync(device: torch.device | str | None = None) -> None:
    """Waits for the device's queued work, so a host timer measures the kernels (no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second) of moving ``nbytes`` in ``seconds``."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def call_once(fns: dict, device: torch.device) -> dict:
    """Calls each function once, untimed (compiles, autotuning): ``{name: seconds}``."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync(device)
        first[name] = time.perf_counter() - t0
    return first


def replay(benchmark, seconds: list) -> None:
    """Hands pytest-benchmark per-round times measured outside it (interleaved with the other
    providers of the group).

    pytest-benchmark has no public way in for times it did not take: its pedantic mode runs a
    no-op here, with the fixture's clock (``benchmark._timer``, read before and after each round
    in pytest-benchmark 4 and 5) replaced by one that returns these times. Under
    ``--benchmark-disable`` pedantic just calls the no-op.
    """
    ticks, t = [], 0.0
    for s in seconds:
        ticks += [t, t + s]
        t += s
    clock = iter(ticks)

    def interleaved_rounds():  # the name pytest-benchmark records as the timer
        return next(clock)

    benchmark._timer = interleaved_rounds
    benchmark.pedantic(lambda: None, rounds=max(1, len(seconds)), iterations=1)


def _group_key(item) -> tuple:
    params = {k: v for k, v in item.callspec.params.items() if k != "provider"}
    return (str(item.path), item.originalname, repr(sorted(params.items())))


def _skipped(item) -> bool:
    return any(m.name == "skip" or (m.name == "skipif" and m.args and m.args[0] is True)
               for m in item.iter_markers())


class Interleaved:
    """Times the providers of each benchmark group in the same rounds, once per group.

    Call it from every provider's test of a group (tests parametrized by ``provider``; the
    other parameters name the group). The first call builds the group's providers that this
    session runs (selected by ``-k``, not skipped), times them round by round with
    :func:`fusedres.report.time_interleaved` (none under ``--benchmark-disable``: ``build``'s
    first calls are then the whole run) and keeps the result until every one of them has
    collected its times.
    """

    def __init__(self):
        self._groups: dict = {}

    def __call__(self, request, benchmark, build, *, device: torch.device, rounds: int,
                 warmup: int, calls: int = 1, host: bool = False):
        """Times the group (first call) and replays this provider's times into ``benchmark``.

        Args:
            request: the test's pytest request.
            build: ``build(names) -> (functions, context)``: the timed function of each named
                provider (it may leave out one it cannot run; that provider's test must then
                skip before calling this), each called once already (see :func:`call_once`),
                and anything the tests need afterwards (models, first-call times).
            rounds, warmup, calls, host: as for :func:`fusedres.report.time_interleaved`.

        Returns:
            ``build``'s context.
        """
        key = _group_key(request.node)
        name = request.node.callspec.params["provider"]
        group = self._groups.get(key)
        if group is None:
            names = [it.callspec.params["provider"] for it in request.session.items
                     if hasattr(it, "callspec") and _group_key(it) == key and not _skipped(it)]
            group = self._groups[key] = {"pending": set(names)}
            try:
                fns, group["context"] = build(names)
                group["times"] = ({} if benchmark.disabled else time_interleaved(
                    fns, rounds, warmup, device, calls=calls, host=host))
            except Exception as e:
                # The group's other tests fail at once instead of building it all again.
                group["error"] = f"{request.node.name} failed: {type(e).__name__}: {e}"
                self._done(key, name)
                raise
        self._done(key, name)
        if "error" in group:
            raise RuntimeError(f"the group's first test, {group['error']}")
        replay(benchmark, group["times"].get(name, []))
        return group["context"]

    def _done(self, key, name: str) -> None:
        group = self._groups[key]
        group["pending"].discard(name)
        if not group["pending"]:
            del self._groups[key]  # the group's models are freed with the last test's context


@pytest.fixture(scope="session")
def interleaved() -> Interleaved:
    """The session's :class:`Interleaved`."""
    return Interleaved()


def _peaks() -> dict:
    path = os.environ.get("FUSEDRES_DEVICE_PEAKS")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def publish(benchmark, info: dict) -> None:
    """Puts ``info`` in the case's extra_info, with GB/s and TFLOP/s as fractions of the device's
    measured peaks when known, the CPU model and the load, and appends the case to
    ``FUSEDRES_BENCH_LOG``.
    """
    info["malloc_keeps_freed_memory"] = MALLOC_TUNED
    info["cpu_model"] = MACHINE["cpu_model"]
    # other processes' load: CPU timings on a shared machine need it beside them
    info["load_average_1min"] = os.getloadavg()[0]
    peaks = _peaks()
    if peaks.get("copy_GBps") and info.get("GB/s") is not None:
        info["GB/s_of_peak"] = info["GB/s"] / peaks["copy_GBps"]
    if peaks.get("matmul_TFLOPs") and info.get("TFLOP/s") is not None:
        info["TFLOP/s_of_peak"] = info["TFLOP/s"] / peaks["matmul_TFLOPs"]
    benchmark.extra_info.update(info)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    case = {"group": benchmark.group, "name": benchmark.name,
            "stats": summarize(list(benchmark.stats.stats.data)), "extra_info": info}
    TIMED_CASES.append(case)
    log = os.environ.get("FUSEDRES_BENCH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(case) + "\n")


# The outermost wrapper (tryfirst) prints after every other summary: pytest-benchmark's tables,
# pytest's short test summary and warnings. Only pytest's closing line follows it.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    yield
    if TIMED_CASES:
        devices = sorted({c["extra_info"].get("device", "cpu") for c in TIMED_CASES} - {"cpu"})
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
        terminalreporter.write_sep("-", "fusedres summary")
        terminalreporter.write_line(
            f"on {', '.join(devices) + ' with host ' if devices else ''}{MACHINE['cpu_model']} "
            f"({MACHINE['cpu_count']} cores, load average {load} at the end, bf16 matrix "
            f"instructions: {MACHINE['native_bf16']}), torch {MACHINE['torch']}")
        terminalreporter.write_line(
            "per group: median ms per call, spread (interquartile range / median), GB/s, "
            "images/s, ratios (reference median / provider median) to eager (the faster of "
            "eager and eager_cl) and to torch.compile [the range the two interquartile "
            "intervals allow; ?: they overlap, not a result], bytes eager moves / bytes the "
            "provider moves, the error check")
        terminalreporter.write_line(format_bench_cases(TIMED_CASES))


def record(benchmark, provider: str, nbytes: float, flops: float = 0, **info) -> None:
    """Publishes the provider, the byte count and the GB/s (and TFLOP/s for ``flops``) of the
    median time, plus ``info``.

    Call after the benchmark ran (``benchmark.stats`` holds the timings then).
    """
    info.update(provider=provider, bytes=int(nbytes))
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        info["GB/s"] = round(gbps(nbytes, median), 2)
        if flops:
            info["TFLOP/s"] = flops / median / 1e12
    publish(benchmark, info)
