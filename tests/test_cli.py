"""The eomt-fast command line, run as a user would."""

import subprocess
import sys

import pytest
import torch

from eomt_fast.testing import TEST_CONFIGS, random_hf_model


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "eomt_fast.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_info_lists_versions_and_every_op():
    from eomt_fast.dispatch import OPS

    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "CUDA available" in result.stdout
    for op in OPS:
        assert op in result.stdout


def test_info_on_a_model(tmp_path):
    pytest.importorskip("transformers")
    random_hf_model(seed=0, dtype=torch.float32, attn_mask_probs=[1.0, 0.0], **TEST_CONFIGS["small_r4"]).save_pretrained(tmp_path)
    result = run_cli("info", "--model", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "attn_mask_probs [1.0, 0.0]" in result.stdout
    assert "torch.float32" not in result.stdout and "ops on cpu, float32" in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert "not used by this model" in lines["rope"] and "not used by this model" in lines["layernorm_swiglu"]
    assert "not used" not in lines["layernorm_mlp"] and "not used" not in lines["attention"]


def test_info_reports_a_bad_model_directory_clearly(tmp_path):
    result = run_cli("info", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "error: model directory not found" in result.stderr


def test_demo_runs_and_prints_shapes():
    result = run_cli("demo", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "masks_queries_logits   (1, 50, 64, 64)" in result.stdout
    assert "forward: median" in result.stdout
