"""The main job (python -m fusedres) at a tiny size on CPU: JSON fields, the error check, the plot.

The fused provider is ``torch_ops`` (tests/conftest.py: the fused autograd Function over the
reference ops), so the check runs on every machine, plus the C++ ``cpu`` backend where it is
built. A fused output that is wrong must make the check fail, which the last test shows.
"""

import importlib.util
import json
import os

import pytest
import torch

import fusedres
from fusedres import report
from fusedres.backends.eager import EagerBackend

TINY = ["--device", "cpu", "--arch", "resnet18", "--batch", "2", "--image-size", "32",
        "--steps", "1"]


def _backends():
    names = ["eager", "torch_ops", "triton"]
    if fusedres.available_backends()["cpu"][0]:
        names += ["cpu", "cpu_cl"]
    return names


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = report.parse_args(TINY + ["--backends", ",".join(_backends()), "--out", str(out)])
    cfg.warmup = 0
    return report.run(cfg, quiet=True), out


def test_json_fields(tiny_report):
    rep, out = tiny_report
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["config"]["arch"] == "resnet18" and on_disk["config"]["batch"] == 2
    for key in ("date", "torch", "cpu_count", "device", "device_name"):
        assert on_disk["machine"][key] is not None
    providers = [r["provider"] for r in on_disk["results"]]
    assert providers == [b for b in _backends() if b != "triton"]
    for r in on_disk["results"]:
        assert r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0
        # The step's peak holds at least what the forward saved for backward.
        assert r["peak_allocated_bytes"] >= r["saved_activation_bytes"] > 0
    eager = on_disk["results"][0]
    assert eager["speedup_train"] == pytest.approx(1.0)
    assert eager["traffic_ratio_train"] == pytest.approx(1.0)
    # A fused unit keeps z and, only with ReLU, y (the mask's source), as eager does: never
    # more activation memory than eager.
    for r in on_disk["results"][1:]:
        if not r["provider"].startswith("eager"):
            assert r["saved_activation_bytes"] <= eager["saved_activation_bytes"], r["provider"]
    if "cpu" in providers:
        cpu = on_disk["results"][providers.index("cpu")]
        assert 0 < cpu["traffic_ratio_train"] < 1 and 0 < cpu["traffic_ratio_eval"] < 1
    # triton cannot be timed on a CPU; it is reported as skipped with the reason.
    assert [s["provider"] for s in on_disk["skipped"]] == ["triton"]
    assert on_disk["skipped"][0]["reason"]
    table = report.format_table(rep)
    assert "| provider |" in table and "| peak train step memory |" in table


def test_error_check_ran_and_passed(tiny_report):
    rep, _ = tiny_report
    assert set(rep["check"]) == {b for b in _backends() if b not in ("eager", "triton")}
    for name, chk in rep["check"].items():
        assert set(chk["tensors"]) == {"logits", *report.GRAD_NAMES}
        for tname, e in chk["tensors"].items():
            assert e["rel_l2_fused"] <= e["bound"], (name, tname, e)
            assert e["max_rel"] < 1e-3, (name, tname, e)
        assert chk["ok"]


def test_plot_written(tiny_report):
    rep, out = tiny_report
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the job writes the JSON only")
    path = os.path.join(out, "report.png")
    assert rep["plot"] == path and os.path.getsize(path) > 1000


class _WrongBackend(EagerBackend):
    """Fused Function over reference ops, with the BN shift off by 0.01: a wrong kernel."""

    name = "wrong_for_test"
    uses_reference_composition = False

    def bn_act_fwd(self, z, scale, shift, residual, relu):
        return super().bn_act_fwd(z, scale, shift + 0.01, residual, relu)


def test_check_catches_a_wrong_backend(monkeypatch):
    monkeypatch.setitem(fusedres.backend._REGISTRY, "wrong_for_test", _WrongBackend())
    chk = report.check_against_eager("resnet18", [report.make_provider("wrong_for_test")],
                                     torch.device("cpu"), torch.float32, 2, 32)
    assert not chk["wrong_for_test"]["ok"]


def test_cpu_providers_run_both_layouts():
    """On the CPU the cpu backend runs NCHW (PyTorch's CPU default) and, as cpu_cl, channels_last;
    on a GPU the default list has no cpu_cl."""
    assert report.default_providers(torch.device("cpu"))[:4] == ["eager", "eager_cl", "cpu",
                                                                 "cpu_cl"]
    assert "cpu_cl" not in report.default_providers(torch.device("cuda"))
    cpu, cpu_cl = report.make_provider("cpu"), report.make_provider("cpu_cl")
    assert (cpu.backend, cpu.channels_last) == ("cpu", False)
    assert (cpu_cl.backend, cpu_cl.channels_last) == ("cpu", True)
    assert report.make_provider("triton").channels_last


def test_time_interleaved_alternates_providers():
    """Every function gets its warm-up, then the timed calls alternate between them."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = report.time_interleaved(fns, steps=3, warmup=2, device=torch.device("cpu"))
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(times) == {"a", "b"}


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


def _case(group, provider, median_s, **info):
    backend = "eager" if provider.startswith("eager") or provider == "compile" else provider
    return {"group": group, "name": f"test[{provider}]", "median_s": median_s,
            "extra_info": {"provider": provider, "backend": backend,
                           "compiled": provider == "compile", **info}}


def test_format_bench_cases_per_group():
    cases = [_case("g1", "eager", 2e-3, **{"GB/s": 100.0, "images/s": 64000.0,
                                          "traffic_ratio_vs_eager": 1.0}),
             _case("g1", "cpu", 1e-3, **{"GB/s": 150.0, "traffic_ratio_vs_eager": 1.25}),
             _case("g2", "eager_cl", 4e-3), _case("g2", "cpu_cl", 5e-3)]
    lines = report.format_bench_cases(cases).splitlines()
    assert lines[0] == "g1" and lines[4] == "g2"
    assert lines[2].split() == ["eager", "2.000", "100.0", "64000.0", "1.00x", "1.00"]
    assert lines[3].split() == ["cpu", "1.000", "150.0", "-", "2.00x", "1.25"]
    # No NCHW eager in g2: the speedup is over eager_cl.
    assert lines[7].split() == ["cpu_cl", "5.000", "-", "-", "0.80x", "-"]


def test_bench_targets_measure_bottleneck_and_memory_bound_cases():
    train = {"kind": "bottleneck", "mode": "train"}
    cases = [_case("b", "eager", 3.0, **train), _case("b", "eager_cl", 2.6, **train),
             _case("b", "compile", 2.0, **train), _case("b", "triton", 1.5, **train),
             _case("b", "cuda", 2.2, **train),
             _case("nocompile", "eager", 3.0, **train), _case("nocompile", "triton", 1.0, **train),
             _case("k", "eager", 1.0, memory_bound=True, **{"GB/s": 900.0}),
             _case("k", "triton", 1.0, memory_bound=True, **{"GB/s": 2500.0}),
             _case("k", "cuda", 1.0, memory_bound=True, **{"GB/s": 2000.0})]
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
