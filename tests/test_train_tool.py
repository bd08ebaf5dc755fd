"""tools/train_default_model.py: the annealing schedule, and a few real training steps end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from eomt_fast import EomtFastForUniversalSegmentation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_default_model", ROOT / "tools" / "train_default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_annealing_goes_block_after_block(tool):
    steps = 1000
    schedule = [tool.anneal_probs(s, steps, 3, 0.4, 0.7) for s in range(steps)]
    assert schedule[0] == [1.0, 1.0, 1.0] and schedule[-1] == [0.0, 0.0, 0.0]
    for k in range(3):
        column = [p[k] for p in schedule]
        assert all(a >= b for a, b in zip(column, column[1:]))  # never rises
        first_below_one = next(s for s, p in enumerate(column) if p < 1.0)
        first_zero = next(s for s, p in enumerate(column) if p == 0.0)
        assert first_below_one == 400 + 100 * k + 1 and first_zero == 500 + 100 * k
    # while block k anneals, the earlier blocks are 0 and the later ones 1
    assert schedule[550] == [0.0, pytest.approx((1 - 50 / 100) ** 0.9), 1.0]


def test_learning_rate_warms_up_then_decays(tool):
    rates = [tool.learning_rate(s, 100, 1e-3, 10) for s in range(100)]
    assert rates[9] == pytest.approx(1e-3) and rates[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 1e-5


def test_a_few_training_steps_write_a_loadable_model(tool, tmp_path):
    out, mid = tmp_path / "model", tmp_path / "mid"
    assert tool.main(["--steps", "10", "--batch-size", "1", "--log-every", "2", "--out", str(out),
                      "--mid-annealing-out", str(mid), "--train-num-points", "256"]) == 0
    log = (out / "train_log.txt").read_text().splitlines()
    assert log[0].startswith("# train_default_model.py") and any(line.startswith("step    10") for line in log)
    final = EomtFastForUniversalSegmentation.from_pretrained(out, backend="torch")
    assert final.masking_probs() == (0.0, 0.0)
    partial = EomtFastForUniversalSegmentation.from_pretrained(mid, backend="torch")
    assert partial.masking_probs()[0] == 0.0 and 0.0 < partial.masking_probs()[1] < 1.0
    assert json.loads((mid / "training.json").read_text())["attn_mask_probs"][1] == pytest.approx(partial.masking_probs()[1])
    x = torch.rand(1, 3, 128, 128)
    assert torch.isfinite(final(x).masks_queries_logits).all()
