"""Packaging: kernels/ is eomt_fast.kernels, never a top-level `kernels` (a PyPI package transformers imports)."""

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import eomt_fast
import eomt_fast.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_is_a_subpackage():
    assert eomt_fast.kernels.__name__ == "eomt_fast.kernels"
    assert Path(eomt_fast.kernels.__file__).parent.name == "kernels"


def _hub_kernels_installed() -> bool:
    """Whether the Hugging Face `kernels` distribution is installed (transformers 5.25 depends on it)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_kernels_cannot_be_imported_top_level_even_from_the_checkout():
    """From the repository root (where ./kernels is on sys.path) a top-level `kernels` holds none of our
    code: it is the Hugging Face `kernels` package when that is installed (transformers imports names from
    it), else an empty stray module; either way transformers imports EoMT and sees the truth."""
    code = (
        "import importlib.metadata, pathlib, sys\n"
        f"root = pathlib.Path({str(ROOT)!r}).resolve()\n"
        "try:\n"
        "    importlib.metadata.distribution('kernels')\n"
        "    real = True\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    real = False\n"
        "import kernels\n"
        "assert not hasattr(kernels, 'attention_ref'), vars(kernels).keys()\n"
        "if real:\n"
        "    assert pathlib.Path(kernels.__file__).resolve().parent != root / 'kernels', kernels.__file__\n"
        "else:\n"
        "    assert kernels.__file__ is None, kernels.__file__\n"
        "try:\n"
        "    import kernels.attention\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    assert pathlib.Path(kernels.attention.__file__).resolve().parent != root / 'kernels'\n"
        "from transformers import EomtForUniversalSegmentation\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert is_kernels_available() == real, (is_kernels_available(), real)\n"
        "print('ok', real)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip() == f"ok {_hub_kernels_installed()}", \
        result.stdout + result.stderr


def test_transformers_does_not_see_our_kernels_as_the_hub_package():
    """transformers reports the Hub `kernels` package as available exactly when it is installed, whether or
    not our kernels/ is on sys.path (python -m pytest from the checkout)."""
    pytest.importorskip("transformers")
    from transformers.utils import import_utils

    check = getattr(import_utils, "is_kernels_available", None)
    if check is None:
        pytest.skip("this transformers has no is_kernels_available")
    assert check() == _hub_kernels_installed()


def test_built_wheel_has_no_top_level_kernels(tmp_path):
    env = dict(os.environ, PIP_NO_INDEX="1")  # build offline with the setuptools already installed
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next(tmp_path.glob("eomt_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level, sorted(top_level)
    assert "eomt_fast/kernels/__init__.py" in names and "eomt_fast/kernels/attention.py" in names
    # the bundled default model is package data
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "train_log.txt"):
        assert f"eomt_fast/data/default_model/{name}" in names, name
    assert top_level <= {"eomt_fast", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top_level


def test_version_is_exposed():
    assert eomt_fast.__version__


def test_works_without_triton():
    """Where Triton is not installed (macOS, Windows) the package imports and runs the references."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from eomt_fast import EomtFastConfig, EomtFastForUniversalSegmentation, dispatch\n"
        "from eomt_fast.kernels._triton import HAS_TRITON\n"
        "assert not HAS_TRITON and dispatch.triton_ops() == {}\n"
        "cfg = EomtFastConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,\n"
        "                     patch_size=8, num_queries=3, num_blocks=1)\n"
        "out = EomtFastForUniversalSegmentation(cfg)(torch.randn(1, 3, 32, 32))\n"
        "assert torch.isfinite(out.masks_queries_logits).all()\n"
        "try:\n"
        "    EomtFastForUniversalSegmentation(cfg, backend='triton')(torch.randn(1, 3, 32, 32))\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton, which is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=triton ran without Triton')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def _launches(node) -> bool:
    """Whether a function's body launches a Triton kernel: a call of a subscript, kernel[grid](...)."""
    import ast

    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript) for n in ast.walk(node))


def test_every_kernel_launcher_runs_on_its_inputs_device():
    """Triton launches on the current CUDA device, not the arguments': each host function that launches a
    kernel is decorated with on_input_device (a model on cuda:1 while cuda:0 is current). Checked on the
    source, so that a new launcher without it fails here, not only on a machine with two GPUs."""
    import ast

    root = Path(eomt_fast.kernels.__file__).parent
    launchers, undecorated = [], []
    for path in sorted(root.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and _launches(node):
                launchers.append(node.name)
                names = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
                if "on_input_device" not in names:
                    undecorated.append(f"{path.name}:{node.lineno} {node.name}")
    assert len(launchers) >= 8 and not undecorated, undecorated


def test_device_of_makes_a_cuda_tensors_device_current(monkeypatch):
    import torch

    from eomt_fast.kernels import _triton

    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    class FakeCudaTensor:
        is_cuda = True
        device = torch.device("cuda", 1)

        def get_device(self) -> int:
            return 1

    current = [0]
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    seen = []
    launch = _triton.on_input_device(lambda first, *args, **kwargs: seen.append((first, args, kwargs)) or "out")
    tensor = FakeCudaTensor()
    assert launch(tensor, 2, k=3) == "out" and seen == [(tensor, (2,), {"k": 3})]
    assert entered == [torch.device("cuda", 1), "exit"]
    seen.clear()
    entered.clear()
    assert launch(first=tensor, k=3) == "out" and seen == [(tensor, (), {"k": 3})]  # the first one by keyword
    assert entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    current[0] = 1
    assert launch(tensor) == "out" and entered == []  # already the current device: nothing to switch
    assert launch(torch.zeros(1)) == "out" and entered == []  # off CUDA: nothing made current
