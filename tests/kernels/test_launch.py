"""The launcher's switches (forced configs, output poisoning, the tensors' device) and its
autotuning: bucketed keys, tuned once per key, persisted across processes."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def _launch():
    from fusedres.kernels import _launch  # after conftest has set TRITON_INTERPRET
    return _launch


def test_forced_config_index(monkeypatch):
    launch = _launch()
    monkeypatch.delenv("FUSEDRES_TRITON_CONFIG", raising=False)
    assert launch.forced_config_index() is None
    monkeypatch.setenv("FUSEDRES_TRITON_CONFIG", "2")
    assert launch.forced_config_index() == 2
    monkeypatch.setenv("FUSEDRES_TRITON_CONFIG", "fast")
    with pytest.raises(ValueError, match="FUSEDRES_TRITON_CONFIG must be a config index"):
        launch.forced_config_index()


def test_deterministic_mode_runs_the_first_config(monkeypatch):
    """Autotuning picks by timing, so two runs could differ in tile sizes and hence in the order
    of fp32 sums: deterministic mode runs config 0 unless a config is forced."""
    launch = _launch()
    monkeypatch.delenv("FUSEDRES_TRITON_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert launch.forced_config_index() == 0
        monkeypatch.setenv("FUSEDRES_TRITON_CONFIG", "1")
        assert launch.forced_config_index() == 1
        torch.use_deterministic_algorithms(False)
        monkeypatch.delenv("FUSEDRES_TRITON_CONFIG")
        assert launch.forced_config_index() is None
    finally:
        torch.use_deterministic_algorithms(was)


def test_outputs_are_poisoned_only_when_asked(monkeypatch):
    launch = _launch()
    monkeypatch.setenv("FUSEDRES_POISON_OUTPUTS", "1")
    out = launch.new_output((3, 4), dtype=torch.float16, memory_format=torch.contiguous_format)
    assert out.shape == (3, 4) and out.dtype == torch.float16 and out.isnan().all()
    monkeypatch.setenv("FUSEDRES_POISON_OUTPUTS", "0")
    calls = []
    monkeypatch.setattr(torch.Tensor, "fill_", lambda self, v: calls.append(v) or self)
    launch.new_output((3, 4))
    assert calls == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launchers_run_on_the_tensors_device():
    seen = []
    wrapped = _launch().on_tensor_device(lambda t: seen.append(torch.cuda.current_device()))
    torch.cuda.set_device(0)
    wrapped(torch.empty(1, device="cuda:1"))
    assert seen == [1] and torch.cuda.current_device() == 0


def test_launchers_pass_cpu_tensors_through():
    wrapped = _launch().on_tensor_device(lambda t, k=0: (t, k))
    t = torch.empty(2)
    assert wrapped(t, k=3) == (t, 3)


class FakeAutotuner:
    """Stands in for ``triton.autotune(configs, key)(kernel)``: "times" the configs by picking
    ``pick(args)`` of them, records the tuning, and reports the pick as Triton's Autotuner does
    (``best_config``, ``configs_timings``)."""

    tunings: list = []

    def __init__(self, configs, pick):
        self.configs, self.pick = configs, pick
        self.best_config = None

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            self.best_config = self.configs[self.pick(args)]
            self.configs_timings = {c: [float(i + 1)] for i, c in enumerate(self.configs)}
            FakeAutotuner.tunings.append(args)
        return run


def _fake_gpu(monkeypatch, launch, pick=lambda args: 1, cache_dir=""):
    """launch() as on a GPU of arch 90, with FakeAutotuner and recorded direct runs."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "device_arch", lambda device: 90)
    monkeypatch.delenv("FUSEDRES_TRITON_CONFIG", raising=False)
    monkeypatch.setenv("FUSEDRES_AUTOTUNE_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(launch.triton, "autotune",
                        lambda configs, key: lambda kernel: FakeAutotuner(configs, pick))
    monkeypatch.setattr(launch, "_TUNED", {})
    monkeypatch.setattr(FakeAutotuner, "tunings", [])
    ran = []
    monkeypatch.setattr(launch, "_run", lambda kernel, grid, args, config, constexprs:
                        ran.append((args, config)))
    return ran



def _table(launch):
    return {90: [launch.cfg(4, 3, BLOCK_M=16), launch.cfg(8, 3, BLOCK_M=32),
                 launch.cfg(8, 4, BLOCK_M=64)]}


def _kernel():
    """A stand-in kernel with a name and module, as persisted configs record them."""


def test_device_queries_are_asked_once_per_device(monkeypatch):
    """device_arch and multiprocessor_count run on every launch: torch.cuda is asked once per
    device index, the current device standing in for an index-less device."""
    launch = _launch()
    asked = []

    def capability(index):
        asked.append(("capability", index))
        return (9, 0) if index == 0 else (8, 0)

    def properties(index):
        asked.append(("properties", index))
        return type("Props", (), {"multi_processor_count": 132 if index == 0 else 108})()

    monkeypatch.setattr(launch, "_DEVICE_ARCH", {})
    monkeypatch.setattr(launch, "_DEVICE_SMS", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for _ in range(3):
        assert launch.device_arch(torch.device("cuda", 0)) == 90
        assert launch.device_arch(torch.device("cuda")) == 90
        assert launch.device_arch(torch.device("cuda", 1)) == 80
        assert launch.multiprocessor_count(torch.device("cuda")) == 132
        assert launch.multiprocessor_count(torch.device("cuda", 1)) == 108
    assert launch.device_arch(torch.device("cpu")) == 0
    assert sorted(asked) == [("capability", 0), ("capability", 1), ("properties", 0),
                             ("properties", 1)]


def test_interpreting_follows_the_kernels():
    """interpreting() says how the kernels were defined: interpreted exactly when it is true."""
    launch = _launch()
    from triton.runtime.interpreter import InterpretedFunction

    from fusedres.kernels import bn
    assert isinstance(bn._bn_act_fwd_kernel, InterpretedFunction) == launch.interpreting()


def test_row_bucket():
    launch = _launch()
    assert [launch.row_bucket(m) for m in (1, 2, 3, 100, 128, 129, 802816)] == \
        [1, 2, 4, 128, 128, 256, 1048576]
    assert launch.row_bucket(0) == 1


def test_host_integer_helpers_match_triton():
    import triton

    launch = _launch()
    for a in [0, 1, 2, 3, 63, 64, 65, 1000, 802816, 2**31 + 5]:
        assert launch.next_power_of_2(a) == triton.next_power_of_2(max(a, 1)), a
        for b in (1, 2, 3, 16, 64, 128, 1000):
            assert launch.cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_each_key_is_tuned_once_then_launched_directly(monkeypatch):
    """The first launch of a key tunes (and the autotuner launches the winner itself); later
    launches with that key run the winner directly; a new key, constexpr or dtype tunes anew."""
    launch = _launch()
    ran = _fake_gpu(monkeypatch, launch)
    table, kernel, dev = _table(launch), object(), torch.device("cpu")
    x16, x32 = torch.empty(4, dtype=torch.float16), torch.empty(4)

    def go(x, m, **flags):
        return launch.launch(kernel, None, (x, m), table=table, key=dict(M=launch.row_bucket(m)),
                             interp_config=None, device=dev, **flags)

    assert go(x16, 100, RELU=True) is table[90][1]
    assert len(FakeAutotuner.tunings) == 1 and ran == []
    assert go(x16, 120, RELU=True) is table[90][1]  # same bucket: no tuning
    assert len(FakeAutotuner.tunings) == 1 and ran == [((x16, 120), table[90][1])]
    go(x16, 200, RELU=True)
    go(x16, 100, RELU=False)
    go(x32, 100, RELU=True)
    assert len(FakeAutotuner.tunings) == 4


def test_one_config_tables_and_forced_configs_never_tune(monkeypatch):
    launch = _launch()
    ran = _fake_gpu(monkeypatch, launch)
    single = {90: [launch.cfg(4, 3, BLOCK_M=16)]}
    launch.launch(object(), None, (1,), table=single, key={}, interp_config=None,
                  device=torch.device("cpu"))
    monkeypatch.setenv("FUSEDRES_TRITON_CONFIG", "2")
    table = _table(launch)
    assert launch.launch(object(), None, (1,), table=table, key={}, interp_config=None,
                         device=torch.device("cpu")) is table[90][2]
    assert FakeAutotuner.tunings == [] and len(ran) == 2


def test_autotuned_launches_from_threads_each_get_their_config(monkeypatch):
    """Two threads launch one kernel with keys tuned to different configs, the second while the
    first is still tuning: each gets back the config its own launch ran (the statistics
    partials are merged with that config's row count)."""
    launch = _launch()
    a_inside, b_began = threading.Event(), threading.Event()

    def pick(args):
        if args[0] == "a":
            a_inside.set()
            b_began.wait(timeout=5)  # b's launch has begun; it waits for a's tuning to end
            return 0
        return 2

    _fake_gpu(monkeypatch, launch, pick)
    kernel, table, got = object(), _table(launch), {}

    def run(which):
        if which == "b":
            b_began.set()
        got[which] = launch.launch(kernel, None, (which,), table=table, key=dict(M=which),
                                   interp_config=None, device=torch.device("cpu"))

    thread_a = threading.Thread(target=run, args=("a",))
    thread_a.start()
    assert a_inside.wait(timeout=5)
    run("b")
    thread_a.join()
    assert got == {"a": table[90][0], "b": table[90][2]}


# Launches a real @triton.jit kernel's (not run: no GPU) through launch() as on an sm_90 GPU with
# a fake autotuner, in its own process; prints what happened as JSON.
_PERSIST_SCRIPT = r"""
import json, sys
import torch, triton, triton.language as tl
from fusedres.kernels import _launch

@triton.jit
def kernel(x_ptr, n, FLAG: tl.constexpr, BLOCK_M: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK_M), 0.0)

events = []
class Tuner:
    def __init__(self, configs):
        self.configs = configs
    def __getitem__(self, grid):
        def run(*args, **kw):
            events.append("tuned")
            self.best_config = self.configs[int(sys.argv[1])]
            self.configs_timings = {c: [1.0, 0.9, 1.1] for c in self.configs}
        return run

_launch.triton.autotune = lambda configs, key: lambda fn: Tuner(configs)
_launch._run = lambda kernel, grid, args, config, constexprs: events.append("ran")
_launch.interpreting = lambda: False
_launch.device_arch = lambda device: 90
table = {90: [_launch.cfg(4, 3, BLOCK_M=16), _launch.cfg(8, 3, BLOCK_M=32),
              _launch.cfg(8, 4, maxnreg=255, BLOCK_M=64)]}
config = _launch.launch(kernel, None, (torch.empty(4), 100), table=table,
                        key=dict(M=_launch.row_bucket(100), stride=(2, 2)), interp_config=None,
                        device=torch.device("cpu"), FLAG=True)
print(json.dumps({"events": events, "config": table[90].index(config)}))
"""


def _persist_run(tmp_path, pick: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "FUSEDRES_TRITON_CONFIG")}
    env["FUSEDRES_AUTOTUNE_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    script = tmp_path / "persist.py"  # @triton.jit needs its source in a file
    script.write_text(_PERSIST_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(pick)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_tuned_configs_persist_across_processes(tmp_path):
    """A second process finds the config the first one tuned on disk and launches it without
    tuning (each process picks a different config if it tunes, so a re-tune would show)."""
    assert _persist_run(tmp_path, 2) == {"events": ["tuned"], "config": 2}
    files = list((tmp_path / "cache").glob("kernel-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["config"]["kwargs"] == {"BLOCK_M": 64} and record["config"]["maxnreg"] == 255
    assert record["key"]["arch"] == 90 and ["M", 128] in record["key"]["key"]
    assert record["key"]["constexprs"] == [["FLAG", True]] and record["key"]["source"]
    assert _persist_run(tmp_path, 0) == {"events": ["ran"], "config": 2}


def test_stale_or_unreadable_persisted_configs_are_tuned_again(monkeypatch, tmp_path):
    """A persisted config no longer in the table, or a damaged file, is tuned again and
    overwritten; a fresh process (here: the in-memory configs dropped) then reads the new one."""
    launch = _launch()
    table = _table(launch)

    def fresh_process_launch(pick):
        _fake_gpu(monkeypatch, launch, pick=lambda args: pick, cache_dir=tmp_path)
        return launch.launch(_kernel, None, (1,), table=table, key=dict(M=8), interp_config=None,
                             device=torch.device("cpu"))

    assert fresh_process_launch(2) is table[90][2]
    (path,) = tmp_path.glob("_kernel-*.json")
    record = json.loads(path.read_text())
    record["config"]["kwargs"] = {"BLOCK_M": 128}
    path.write_text(json.dumps(record))
    assert fresh_process_launch(1) is table[90][1] and len(FakeAutotuner.tunings) == 1
    path.write_text("{truncated")
    assert fresh_process_launch(0) is table[90][0] and len(FakeAutotuner.tunings) == 1
    assert fresh_process_launch(2) is table[90][0] and FakeAutotuner.tunings == []


def test_unwritable_cache_dir_warns_and_keeps_the_config_in_memory(monkeypatch, tmp_path):
    launch = _launch()
    blocker = tmp_path / "file"
    blocker.write_text("")
    _fake_gpu(monkeypatch, launch, cache_dir=blocker / "sub")
    table, kernel = _table(launch), _kernel
    monkeypatch.setattr(launch, "_WARNED_UNWRITABLE", set())
    with pytest.warns(UserWarning, match="cannot be saved"):
        launch.launch(kernel, None, (1,), table=table, key={}, interp_config=None,
                      device=torch.device("cpu"))
    launch.launch(kernel, None, (1,), table=table, key={}, interp_config=None,
                  device=torch.device("cpu"))
    assert len(FakeAutotuner.tunings) == 1


def _patch_lang_tensor_like_triton_3_6(tensor, scope):
    # Triton 3.6's conversion (its interpreter.py), which numpy 2.4 rejects for 1-element arrays.
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


class _RecordingScope:
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((name, value))
        setattr(obj, name, value)


def test_interpreter_compat_fixes_only_the_old_conversion(monkeypatch):
    """The numpy 2.4 fix for triton 3.6's interpreter: applied where the old conversion is, a
    no-op elsewhere (the installed triton, twice)."""
    from triton.runtime import interpreter

    from fusedres.kernels import _interpreter_compat

    np = pytest.importorskip("numpy")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _patch_lang_tensor_like_triton_3_6)
    assert _interpreter_compat.apply()
    assert not _interpreter_compat.apply(), "applied twice"

    class Handle:
        data = np.array([7], dtype=np.int32)  # how the interpreter holds a runtime scalar

    class Tensor:
        handle = Handle()

    scope = _RecordingScope()
    interpreter._patch_lang_tensor(Tensor, scope)
    assert [name for name, _ in scope.changes] == ["__index__", "__index__"]
    assert range(Tensor())[-1] == 6

    monkeypatch.undo()
    # The installed triton either never needed the fix or got it when fusedres.kernels loaded.
    assert not _interpreter_compat.apply(), "patched the installed triton again"
