"""The main job (python -m fusedres) and the benchmark summary, without timing assertions.

A tiny run on CPU (resnet18, batch 2, 64x64, one round) checks the JSON, the error check of
every provider (train and eval) and the chart; the rest checks the pieces the figures rest on:
the command line's errors and help, the statistics and when a ratio is not a result, the
interleaving, the memory measurement without profiler noise on stderr, and the benchmark
conftest (its groups timed in the same rounds, its summary printed after pytest-benchmark's).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedres
from fusedres import report

# One worker runs the whole module under pytest-xdist, so its module fixtures (the tiny report) run
# once.
pytestmark = pytest.mark.xdist_group("report")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--arch", "resnet18", "--batch", "2", "--image-size", "64",
        "--rounds", "1", "--warmup", "0", "--dtype", "float32"]
ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _backends():
    names = ["eager", "eager_cl"]
    if fusedres.available_backends()["cpu"][0]:
        names += ["cpu", "cpu_cl"]
    return names + ["triton"] + (["onnxruntime"] if ONNX else [])


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = report.parse_args(TINY + ["--backends", ",".join(_backends()), "--out", str(out)])
    return report.run(cfg, quiet=True), out


def test_json_fields(tiny_report):
    rep, out = tiny_report
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["config"]["archs"] == ["resnet18"] and on_disk["config"]["batch"] == 2
    for key in ("date", "torch", "cpu_count", "cpu_model", "device_name", "load_average",
                "native_bf16"):
        assert on_disk["machine"][key] is not None
    groups = {(g["arch"], g["dtype"], g["mode"]): g for g in on_disk["groups"]}
    assert set(groups) == {("resnet18", "float32", "train"), ("resnet18", "float32", "eval")}
    timed = [b for b in _backends() if b != "triton"]
    for (_, _, mode), g in groups.items():
        names = [r["provider"] for r in g["results"]]
        assert names == [b for b in timed if not (mode == "train" and b == "onnxruntime")]
        assert g["baseline"] in ("eager", "eager_cl") and g["compile"] is None
        for r in g["results"]:
            assert len(r["times_s"]) == 1 and r["median_s"] == r["times_s"][0] > 0
            assert r["spread"] == 0 and r["images_per_s"] > 0
            assert r["vs_compile"] is None
            if r["provider"] == g["baseline"]:
                assert r["vs_eager"] is None
            else:  # one round is never a result
                assert r["vs_eager"]["ratio"] > 0 and not r["vs_eager"]["result"]
        if mode == "train":
            eager = g["results"][0]
            # The step's peak holds at least what the forward saved for backward.
            for r in g["results"]:
                assert r["peak_allocated_bytes"] >= r["saved_activation_bytes"] > 0
                # A fused unit keeps z and, only with ReLU, y (the mask's source), as eager
                # does: never more activation memory than eager.
                assert r["saved_activation_bytes"] <= eager["saved_activation_bytes"], r
            if "cpu" in names:  # bytes eager moves / bytes the fused units move
                assert g["results"][names.index("cpu")]["traffic_ratio"] > 1
        else:
            assert [s["provider"] for s in g["skipped"]] == []
    train_skips = [s["provider"] for s in groups["resnet18", "float32", "train"]["skipped"]]
    assert train_skips == (["onnxruntime"] if ONNX else [])
    # triton cannot be timed on a CPU; it is reported as skipped with the reason.
    assert [s["provider"] for s in on_disk["skipped"]] == ["triton"]
    assert on_disk["skipped"][0]["reason"]
    # One round: every ratio is flagged, in the warnings and the targets.
    assert len(on_disk["warnings"]) == 2 and "fewer than 3 rounds" in on_disk["warnings"][0]
    assert {t["verdict"] for t in on_disk["targets"]} <= {"met", "missed", "unresolved"}
    text = report.format_table(rep)
    assert rep["machine"]["cpu_model"] in text and "| provider | median ms | spread |" in text
    from fusedres._ext import _C
    if _C is not None:  # the kernel build in use, as build_info names it, beside every figure
        assert on_disk["machine"]["cpu_kernels"] in ("AVX512", "AVX2", "DEFAULT")
        assert f"in use: {on_disk['machine']['cpu_kernels']} " in _C.build_info()
        assert f"(CPU kernels {on_disk['machine']['cpu_kernels']})" in text
    assert "not a result" in text and "error check: every provider ok" in text


def test_error_check_ran_and_passed(tiny_report):
    rep, _ = tiny_report
    for g in rep["groups"]:
        for r in g["results"]:
            chk = r["check"]
            expected = {"logits", *report.GRAD_NAMES} if g["mode"] == "train" else {"logits"}
            assert set(chk["tensors"]) == expected
            for tname, e in chk["tensors"].items():
                assert e["rel_l2"] <= e["bound"], (g["mode"], r["provider"], tname, e)
            assert chk["ok"] and chk["worst"] in expected


def test_plot_written(tiny_report):
    rep, out = tiny_report
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the job writes the JSON only")
    path = os.path.join(out, "report.png")
    assert rep["plot"] == path and os.path.getsize(path) > 1000


def test_check_catches_a_wrong_model(monkeypatch):
    """A provider whose model is off (one BatchNorm shift moved by 0.01) fails the check, in
    training and in eval."""
    build = report.build_model

    def wrong(arch, provider, device, base=None):
        model = build(arch, provider, device, base)
        if provider.name == "eager_cl":
            with torch.no_grad():
                model.layer1[0].bn1.bias += 0.01
        return model

    monkeypatch.setattr(report, "build_model", wrong)
    providers = [report.make_provider("eager_cl"), report.make_provider("eager")]
    for mode in ("train", "eval"):
        chk = report.check_against_eager("resnet18", providers, torch.device("cpu"),
                                         torch.float32, 2, 64, mode=mode)
        assert not chk["eager_cl"]["ok"] and chk["eager"]["ok"], mode


def test_a_provider_that_raises_is_reported_and_the_others_measured(monkeypatch):
    build = report.build_model

    def broken(arch, provider, device, base=None):
        if provider.name == "eager_cl":
            raise RuntimeError("kernel exploded\nsecond line")
        return build(arch, provider, device, base)

    monkeypatch.setattr(report, "build_model", broken)
    x = torch.randn(2, 3, 64, 64)
    providers = [report.make_provider("eager"), report.make_provider("eager_cl")]
    group = report.ModelGroup("resnet18", "eval", torch.float32, report.make_base("resnet18", x),
                              x, providers)
    group.prepare()
    assert group.failed == {"eager_cl": "RuntimeError: kernel exploded"}
    assert set(group.check()) == set(group.time(1, 0)) == {"eager"}


# -- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--backends", "eager,foo"], "--backends: unknown provider 'foo'"),
    (["--arch", "resnet99"], "unknown --arch value 'resnet99'"),
    (["--dtype", "fp8"], "unknown --dtype value 'fp8'"),
    (["--modes", "predict"], "unknown --modes value 'predict'"),
    (["--image-size", "32"], "--image-size must be at least 64"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--device", "tpu:0"], "--device 'tpu:0'"),
    (["--batch", "two"], "invalid int value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        report.parse_args(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m fusedres: error: "), lines
    assert message in lines[0]


def test_no_usable_provider_exits_2_with_one_line(capsys, tmp_path):
    code = report.main(["--device", "cpu", "--backends", "triton", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("python -m fusedres: error: none of the providers")


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        report.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    cfg = report.default_config("cpu")
    for expected in ("(default: resnet50)", "(default: 8)", "(default: 112)",
                     f"(default: {cfg.rounds})", f"(default: {','.join(cfg.dtypes)})",
                     "(default: fusedres_results)"):
        assert expected in text, expected


def test_default_dtypes_follow_native_bf16(monkeypatch):
    monkeypatch.setattr(report, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert report.native_bf16()[0] is False
    assert report.default_config("cpu").dtypes == ["float32"]
    monkeypatch.setattr(report, "_cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert report.native_bf16() == (True, "amx_bf16")
    assert report.default_config("cpu").dtypes == ["float32", "bfloat16"]
    cfg = report.default_config("cpu")
    assert (cfg.archs, cfg.batch, cfg.image_size) == (["resnet50"], 8, 112)


def test_parse_args_lists():
    cfg = report.parse_args(["--device", "cpu", "--arch", "resnet50,resnet18", "--dtype",
                             "fp32,bf16,float32", "--modes", "eval", "--steps", "4"])
    assert cfg.archs == ["resnet50", "resnet18"] and cfg.dtypes == ["float32", "bfloat16"]
    assert cfg.modes == ["eval"] and cfg.rounds == 4


def test_providers():
    """On the CPU the cpu backend runs NCHW (PyTorch's CPU default) and, as cpu_cl,
    channels_last; torch.compile and onnxruntime are default providers on the CPU only."""
    cpu_defaults = report.default_providers(torch.device("cpu"))
    assert cpu_defaults[:5] == ["eager", "eager_cl", "compile", "cpu", "cpu_cl"]
    assert "onnxruntime" in cpu_defaults
    gpu_defaults = report.default_providers(torch.device("cuda"))
    assert not {"cpu_cl", "compile", "onnxruntime"} & set(gpu_defaults)
    cpu, cpu_cl = report.make_provider("cpu"), report.make_provider("cpu_cl")
    assert (cpu.backend, cpu.channels_last) == ("cpu", False)
    assert (cpu_cl.backend, cpu_cl.channels_last) == ("cpu", True)
    assert report.make_provider("triton").channels_last
    ort = report.make_provider("onnxruntime")
    assert not ort.fused and cpu.fused
    cpu_dev = torch.device("cpu")
    assert not report.provider_status(ort, cpu_dev, "train")[0]
    assert not report.provider_status(ort, cpu_dev, "eval", torch.bfloat16)[0]
    with pytest.raises(ValueError, match="unknown provider"):
        report.make_provider("nope")


# -- statistics ----------------------------------------------------------------------------------

def test_summarize_quartiles_and_spread():
    s = report.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_s"], s["q1_s"], s["q3_s"], s["min_s"], s["max_s"]) == (3, 2, 4, 1, 5)
    assert s["spread"] == pytest.approx(2 / 3) and s["rounds"] == 5
    one = report.summarize([2.0])
    assert one["q1_s"] == one["q3_s"] == 2.0 and one["spread"] == 0


def test_a_ratio_is_a_result_only_where_the_intervals_are_apart():
    slow, fast = report.summarize([10, 11, 12, 13, 14]), report.summarize([7, 8, 8.5, 9, 10])
    c = report.compare(slow, fast)
    assert c["ratio"] == pytest.approx(12 / 8.5) and c["result"]
    assert c["lo"] == pytest.approx(11 / 9) and c["hi"] == pytest.approx(13 / 8)
    close = report.summarize([8, 9, 10.5, 11, 12])  # q1 9 < fast's q3 9: overlap
    assert not report.compare(close, fast)["result"]
    assert not report.compare(fast, close)["result"]
    # Apart, but two rounds give no interquartile range worth the name.
    assert not report.compare(report.summarize([10, 10]), report.summarize([5, 5]))["result"]


def _group(mode, dtype, rows, baseline="eager", compile_name=None, rounds=5):
    return {"arch": "resnet50", "dtype": dtype, "mode": mode, "rounds": rounds,
            "baseline": baseline, "compile": compile_name, "results": rows}


def _row(name, backend, vs_eager, vs_compile=None):
    return {"provider": name, "backend": backend, "vs_eager": vs_eager, "vs_compile": vs_compile}


def _ratio(ratio, lo, hi, result=True):
    return {"ratio": ratio, "lo": lo, "hi": hi, "result": result}


def test_warnings_and_targets():
    rep = {"machine": {"device": "cpu", "native_bf16_found": True}, "groups": [
        _group("train", "float32", [
            _row("eager", "eager", None, _ratio(1.0, 0.9, 1.1, False)),
            _row("compile", "eager", _ratio(1.0, 0.9, 1.1, False), None),
            _row("cpu", "cpu", _ratio(1.2, 1.12, 1.3), _ratio(1.05, 0.98, 1.1, False))],
               compile_name="compile"),
        _group("eval", "bfloat16", [_row("eager_cl", "eager", None),
                                    _row("cpu_cl", "cpu", _ratio(1.3, 1.2, 1.4))],
               baseline="eager_cl"),
        # One round: a ratio clear of the target, but no result, so no verdict either way.
        _group("eval", "float32", [_row("eager_cl", "eager", None),
                                   _row("cpu_cl", "cpu", _ratio(7.5, 7.5, 7.5, False))],
               baseline="eager_cl", rounds=1)]}
    warnings = report.warnings_of(rep)
    assert len(warnings) == 2 and warnings[0].startswith("resnet50 float32 train: not a result")
    assert warnings[1].startswith("resnet50 float32 eval: not a result (fewer than 3 rounds")
    assert "eager vs compile 1.00x [0.90-1.10] ?" in warnings[0]
    assert "cpu vs compile 1.05x [0.98-1.10] ?" in warnings[0]
    assert "cpu vs eager" not in warnings[0]  # 1.12-1.3: a result
    verdicts = {(t["group"], t["provider"], t["what"]): t["verdict"]
                for t in report.model_targets(rep)}
    assert verdicts == {
        ("resnet50 float32 train", "cpu", "vs eager >= 1.1x"): "met",
        ("resnet50 float32 train", "cpu", "vs torch.compile > 1x"): "unresolved",
        ("resnet50 bfloat16 eval", "cpu_cl", "vs eager >= 1.5x"): "missed",
        ("resnet50 float32 eval", "cpu_cl", "vs eager >= 1.5x"): "unresolved"}
    # The targets are for the 2-core CPU machine, not for a GPU.
    assert report.model_targets(dict(rep, machine={"device": "cuda"})) == []
    # The bfloat16 ones only where the CPU has native bf16 matrix instructions.
    without = {(t["group"], t["provider"], t["what"]) for t in report.model_targets(
        dict(rep, machine={"device": "cpu", "native_bf16_found": False}))}
    assert without == set(verdicts) - {("resnet50 bfloat16 eval", "cpu_cl", "vs eager >= 1.5x")}


# -- timing and memory ---------------------------------------------------------------------------

def test_time_interleaved_rotates_the_providers():
    """Every function gets its warm-up, then each round calls every function once, starting
    one later each round."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = report.time_interleaved(fns, rounds=4, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    calls.clear()
    report.time_interleaved(fns, rounds=2, warmup=0, device=torch.device("cpu"), calls=3)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a"] * 3


MiB = 2**20


def test_cpu_peak_memory_of_a_known_allocation_pattern():
    """1 MiB, then 2 MiB, free the first, then 4 MiB: 6 MiB live at the peak. A tensor that
    was live before the call does not count, and neither do later, smaller allocations."""
    before = torch.empty(8 * MiB, dtype=torch.uint8)

    def pattern():
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del a
        c = torch.empty(4 * MiB, dtype=torch.uint8)
        del b, c
        return torch.empty(MiB, dtype=torch.uint8)

    assert report.cpu_peak_memory(pattern) == 6 * MiB
    assert report.peak_memory(pattern, torch.device("cpu")) == 6 * MiB
    assert before.numel() == 8 * MiB  # kept alive through both calls


def test_cpu_peak_memory_counts_what_ops_allocate_inside():
    """A matmul's output is allocated inside the op, not by Python: it is counted; an in-place
    op between tensors allocates nothing."""
    x, y = torch.randn(256, 256), torch.randn(256, 256)
    assert report.cpu_peak_memory(lambda: x.add_(y)) == 0
    assert report.cpu_peak_memory(lambda: x @ y) == 256 * 256 * 4


def test_cpu_peak_memory_keeps_profiler_lines_off_stderr(capfd):
    """libkineto writes "USDT: ... profiler_start" lines to file descriptor 2; they are dropped,
    and what the measured code itself writes to stderr is passed on."""
    def noisy():
        print("from the measured code", file=sys.stderr)
        return torch.empty(MiB, dtype=torch.uint8)

    assert report.cpu_peak_memory(noisy) == MiB
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "USDT" not in err
    assert err == "from the measured code\n"


def test_cpu_peak_memory_warns_nothing():
    """torch 2.11 and 2.12 warn once per process on a profile started without acc_events; the
    main job measures memory this way, so the check runs in a fresh process."""
    code = ("import warnings, torch\n"
            "from fusedres.report import cpu_peak_memory\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    cpu_peak_memory(lambda: torch.empty(1024))\n"
            "print([str(w.message) for w in caught])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip() == "[]", out


# -- the benchmark summary -----------------------------------------------------------------------

def _case(group, provider, times, **info):
    backend = "eager" if provider.startswith("eager") or provider == "compile" else provider
    return {"group": group, "name": f"test[{provider}]", "stats": report.summarize(times),
            "extra_info": {"provider": provider, "backend": backend,
                           "compiled": provider == "compile", **info}}


def test_format_bench_cases_per_group():
    cases = [_case("g1", "eager", [2e-3] * 5, **{"GB/s": 100.0, "images/s": 64000.0,
                                                 "traffic_ratio_vs_eager": 1.0}),
             _case("g1", "eager_cl", [3e-3] * 5),
             _case("g1", "compile", [1.6e-3, 1.7e-3, 1.8e-3, 1.9e-3, 2.0e-3]),
             _case("g1", "cpu", [0.9e-3, 1e-3, 1e-3, 1e-3, 1.1e-3],
                   **{"GB/s": 150.0, "traffic_ratio_vs_eager": 1.25, "check": "ok"}),
             _case("g2", "eager_cl", [4e-3, 4.5e-3, 5e-3]),
             _case("g2", "cpu_cl", [4.4e-3, 5e-3, 6e-3])]
    lines = report.format_bench_cases(cases).splitlines()
    assert lines[0] == "g1" and lines[6] == "g2"
    # eager (2 ms) is faster than eager_cl: the baseline; compile is faster still.
    assert lines[2].split() == ["eager", "2", "0.0%", "100.0", "64000.0", "baseline",
                                "0.90x", "[0.85-0.95]", "1.00", "-"]
    assert lines[4].split() == ["compile", "1.8", "11.1%", "-", "-", "1.11x", "[1.05-1.18]",
                                "baseline", "-", "-"]
    assert lines[5].split() == ["cpu", "1", "0.0%", "150.0", "-", "2.00x", "[2.00-2.00]",
                                "1.80x", "[1.70-1.90]", "1.25", "ok"]
    # g2 has no NCHW eager: eager_cl is the baseline. Its 4.25-4.75 ms against cpu_cl's
    # 4.7-5.5 ms overlap: not a result.
    assert lines[9].split() == ["cpu_cl", "5", "16.0%", "-", "-", "0.90x", "[0.77-1.01]", "?",
                                "-", "-", "-"]
    assert lines[-2].startswith("not results (1:") and lines[-1] == "  g2: cpu_cl"


def test_bench_targets_measure_bottleneck_and_memory_bound_cases():
    train = {"kind": "bottleneck", "mode": "train"}
    cases = [_case("b", "eager", [3.0], **train), _case("b", "eager_cl", [2.6], **train),
             _case("b", "compile", [2.0], **train), _case("b", "triton", [1.5], **train),
             _case("b", "cuda", [2.2], **train),
             _case("nocompile", "eager", [3.0], **train),
             _case("nocompile", "triton", [1.0], **train),
             _case("k", "eager", [1.0], memory_bound=True, **{"GB/s": 900.0}),
             _case("k", "triton", [1.0], memory_bound=True, **{"GB/s": 2500.0}),
             _case("k", "cuda", [1.0], memory_bound=True, **{"GB/s": 2000.0})]
    rows = {(r["what"], r["provider"]): r for r in report.bench_targets(cases, copy_gbps=3000.0)}
    # Eager providers are the baselines, not judged.
    assert set(rows) == {("b", "triton"), ("b", "cuda"), ("nocompile", "triton"), ("k", "triton"),
                         ("k", "cuda")}
    # triton: 2.6 / 1.5 = 1.73x the faster eager layout, 2.0 / 1.5 = 1.33x compile.
    assert rows["b", "triton"]["ok"] is True and "1.73x eager" in rows["b", "triton"]["measured"]
    assert rows["b", "cuda"]["ok"] is False  # 1.18x eager, 0.91x compile
    assert rows["nocompile", "triton"]["ok"] is None  # nothing to compare with
    assert rows["k", "triton"]["ok"] is True and "83%" in rows["k", "triton"]["measured"]
    assert rows["k", "cuda"]["ok"] is False
    text = report.format_targets(cases, 3000.0)
    assert "2 of 4 targets met, 1 not comparable" in text
    # Without a measured copy bandwidth the memory-bound kernels are not judged.
    assert {r["what"] for r in report.bench_targets(cases, copy_gbps=None)} == {"b", "nocompile"}


_BENCH_TEST = '''
import torch
import pytest
from conftest import publish

CALLS = []


@pytest.mark.parametrize("provider", ["eager", "cpu",
                                      pytest.param("cuda", marks=pytest.mark.skip(reason="no"))])
@pytest.mark.parametrize("size", [1, 2])
def test_group(benchmark, request, interleaved, size, provider):
    benchmark.group = f"group {size}"

    def build(names):
        assert names == ["eager", "cpu"]  # this group's selected, unskipped providers
        return {n: (lambda n=n: CALLS.append((size, n))) for n in names}, "context"

    assert interleaved(request, benchmark, build, device=torch.device("cpu"), rounds=3,
                       warmup=0) == "context"
    publish(benchmark, {"provider": provider, "backend": provider})


BUILDS = []


@pytest.mark.parametrize("provider", ["eager", "cpu"])
def test_broken_group(benchmark, request, interleaved, provider):
    def build(names):
        BUILDS.append(names)
        raise RuntimeError("kernel exploded")

    interleaved(request, benchmark, build, device=torch.device("cpu"), rounds=3, warmup=0)


def test_a_broken_group_is_built_once():
    assert BUILDS == [["eager", "cpu"]]


def test_interleaved_once_per_group():
    assert CALLS == [(1, "eager"), (1, "cpu"), (1, "cpu"), (1, "eager"), (1, "eager"), (1, "cpu"),
                     (2, "eager"), (2, "cpu"), (2, "cpu"), (2, "eager"), (2, "eager"), (2, "cpu")]
'''


def test_benchmark_conftest_interleaves_and_prints_its_summary_last(tmp_path):
    """Through pytest in a subprocess (pytester's plugin is not enabled in this suite): the
    providers of a group run in the same rounds, once per group (a broken group is built once),
    and the fusedres summary comes after pytest-benchmark's tables and pytest's summary."""
    pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark")
    with open(os.path.join(REPO, "benchmarks", "conftest.py")) as f:
        (tmp_path / "conftest.py").write_text(f.read())
    (tmp_path / "test_fake_bench.py").write_text(textwrap.dedent(_BENCH_TEST))
    # Not as an xdist worker: pytest-benchmark disables itself where PYTEST_XDIST_WORKER is set.
    env = {k: v for k, v in os.environ.items()
           if k != "FUSEDRES_BENCH_LOG" and not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-p", "no:cacheprovider",
                           "-q", "-rsf", "--benchmark-columns=median", "-W", "ignore"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert "2 failed, 6 passed, 2 skipped" in out, out + proc.stderr
    # The first test of a broken group fails with the error, the others at once, naming it.
    assert " RuntimeError: kernel exploded\n" in out
    assert ("RuntimeError: the group's first test, test_broken_group[eager] failed: "
            "RuntimeError: kernel exploded\n") in out
    # pytest-benchmark's tables and pytest's short summary, then ours, then pytest's closing line.
    summary = out.index("fusedres summary")
    assert out.rindex("benchmark 'group 2'") < out.rindex("Legend:") < summary
    assert out.index("short test summary info") < summary
    tail = out[summary:]
    assert "group 1\n" in tail and "group 2\n" in tail
    assert "Legend:" not in tail and "benchmark '" not in tail and "SKIPPED" not in tail
