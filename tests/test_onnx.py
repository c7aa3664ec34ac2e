"""ONNX export of a fused model: ``to_eager`` then ``torch.onnx.export``, run in onnxruntime.

Needs ``onnx``, ``onnxruntime`` and ``onnxscript`` (torch.onnx's exporter); skipped without them.
"""

import pytest
import torch

import fusedres

onnx = pytest.importorskip("onnx", reason="pip install onnx")
ort = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (pip install onnxscript)")


def _trained_resnet18() -> torch.nn.Module:
    """A fused resnet18 (10 classes) in eval, with non-trivial running statistics."""
    torch.manual_seed(0)
    backend = "cpu" if fusedres.available_backends()["cpu"][0] else "torch_ops"
    fused = fusedres.models.resnet18(num_classes=10, backend=backend)
    with torch.no_grad():
        for _ in range(3):
            fused(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return fused.eval()


def test_resnet18_onnx_matches_fused_logits(tmp_path):
    fused = _trained_resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = fused(x)
    eager = fusedres.to_eager(fused)
    assert not any(type(m).__module__.startswith("fusedres.modules") for m in eager.modules())
    path = str(tmp_path / "resnet18.onnx")
    torch.onnx.export(eager, (x,), path, input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}})
    onnx.checker.check_model(onnx.load(path))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
    x5 = torch.randn(5, 3, 32, 32)  # the batch dimension stays dynamic
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x5.numpy()})[0]),
                                   fused(x5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_fused_model_exports_directly(tmp_path, dynamo):
    """torch.onnx.export of the fused model itself, without to_eager: both exporters record the
    eager composition (ONNX's own operators; fusedres's ops have none), onnxruntime gives the
    fused logits, and the model runs fused again afterwards. Before: the default exporter failed
    ("No ONNX function found for fusedres.unit_eval"), the TorchScript one in the tracer."""
    fused = _trained_resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = fused(x)
    path = str(tmp_path / "resnet18.onnx")
    torch.onnx.export(fused, (x,), path, input_names=["images"], output_names=["logits"],
                      dynamo=dynamo)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    domains = {node.domain for node in model.graph.node} - {"", "ai.onnx"}
    assert not domains, f"nodes outside ONNX's own operators: {domains}"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
    assert fusedres.fusability.eager_only_reason() is None
    with torch.no_grad():
        assert torch.equal(fused(x), expected)
