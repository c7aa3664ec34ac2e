"""The launcher's switches: forced configs, output poisoning, the tensors' device."""

import threading

import pytest
import torch


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


def test_autotuned_launches_from_threads_each_get_their_config(monkeypatch):
    """Two threads launch one kernel through the same autotuner, with keys tuned to different
    configs: each gets back the config its own launch ran, not the other's (the statistics
    partials are merged with that config's row count). With a fake autotuner, on the CPU: a's
    launch waits inside the autotuner, up to a timeout, for b's launch to begin."""
    launch = _launch()
    a_inside, b_began = threading.Event(), threading.Event()

    class FakeAutotuner:
        best_config = None

        def __getitem__(self, grid):
            def run(which):
                self.best_config = which  # what Triton's Autotuner does, once per key
                if which == "a":
                    a_inside.set()
                    b_began.wait(timeout=0.5)
                else:
                    b_began.set()
            return run

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.delenv("FUSEDRES_TRITON_CONFIG", raising=False)
    monkeypatch.setattr(launch.triton, "autotune", lambda configs, key: lambda k: FakeAutotuner())
    monkeypatch.setattr(launch, "_TUNED", {})
    kernel, table, got = object(), {0: [launch.cfg(1, 1, BLOCK_M=16)]}, {}

    def run(which):
        got[which] = launch.launch(kernel, None, (which,), table=table, key=(),
                                   interp_config=None, device=torch.device("cpu"))

    thread_a = threading.Thread(target=run, args=("a",))
    thread_a.start()
    assert a_inside.wait(timeout=5)
    run("b")
    thread_a.join()
    assert got == {"a": "a", "b": "b"}


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
