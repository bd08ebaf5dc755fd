"""dispatch: which implementation every op runs, and why."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

from eomt_fast import EomtFastConfig, dispatch, kernels
from eomt_fast.kernels import attention_ref

CUDA = torch.device("cuda")  # plan() only reasons about the device; nothing runs on it here


def paths(*args, **kwargs):
    return {p.op: p for p in dispatch.plan(*args, **kwargs)}


def test_cpu_runs_every_reference():
    for path in dispatch.plan("auto", torch.device("cpu"), torch.float32):
        assert path.impl == "torch" and "CUDA only" in path.reason


def test_cuda_uses_every_registered_kernel():
    available = dispatch.triton_ops()
    assert "attention" in available and "layernorm_mlp" in available
    for op, path in paths("auto", CUDA, torch.bfloat16).items():
        assert path.impl == ("triton" if op in available else "torch"), (op, path)


def _parameters(f) -> list[tuple[str, object, object]]:
    f = getattr(f, "_init_fn", f)  # a torch.library custom op: the function it was made from
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]


def test_every_kernel_has_its_references_signature():
    # the model calls an op the same way whichever implementation dispatch gave it
    available = dispatch.triton_ops()
    assert available
    for op, kernel in available.items():
        assert _parameters(kernel) == _parameters(getattr(kernels, dispatch.OPS[op][0])), op


def _launches(tree: ast.AST):
    """Every ``kernel[grid](...)`` call in a module's syntax tree."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)]


def test_every_kernel_launch_passes_the_launch_options():
    # LAUNCH_OPTIONS pins FMA contraction on, whatever the installed Triton's default (3.10 turns it off)
    from eomt_fast.kernels._triton import LAUNCH_OPTIONS

    assert LAUNCH_OPTIONS == {"enable_fp_fusion": True}
    found = 0
    for name in dispatch.KERNEL_MODULES:
        path = Path(inspect.getfile(importlib.import_module(f"eomt_fast.kernels.{name}")))
        for call in _launches(ast.parse(path.read_text())):
            found += 1
            spread = [k.value.id for k in call.keywords if k.arg is None and isinstance(k.value, ast.Name)]
            assert "LAUNCH_OPTIONS" in spread, f"{path.name}:{call.lineno} launches a kernel without **LAUNCH_OPTIONS"
    assert found >= 14  # the launches there are (a parse that finds none would pass vacuously)


def test_float64_stays_on_the_references():
    assert all(p.impl == "torch" and "float64" in p.reason for p in dispatch.plan("auto", CUDA, torch.float64))


def test_backend_torch_is_always_the_reference():
    assert all(p.impl == "torch" for p in dispatch.plan("torch", CUDA, torch.bfloat16))


def test_attention_kernel_limit_sends_large_heads_to_the_reference():
    config = EomtFastConfig(hidden_size=640, num_attention_heads=4)  # head_dim 160
    got = paths("auto", CUDA, torch.bfloat16, config)["attention"]
    assert got.impl == "torch" and "head_dim 160 > 128" in got.reason
    ops = dispatch.resolve("auto", CUDA, torch.bfloat16, config)
    assert ops["attention"] is attention_ref


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.plan("fast", CUDA)
