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
    assert any(line.startswith("# scenes {") and '"THING_RADIUS": [' in line for line in log)
    final = EomtFastForUniversalSegmentation.from_pretrained(out, backend="torch")
    assert final.masking_probs() == (0.0, 0.0)
    partial = EomtFastForUniversalSegmentation.from_pretrained(mid, backend="torch")
    assert partial.masking_probs()[0] == 0.0 and 0.0 < partial.masking_probs()[1] < 1.0
    assert json.loads((mid / "training.json").read_text())["attn_mask_probs"][1] == pytest.approx(partial.masking_probs()[1])
    x = torch.rand(1, 3, 128, 128)
    assert torch.isfinite(final(x).masks_queries_logits).all()


def test_continuing_with_more_query_layers_keeps_every_weight(tool, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--batch-size", "1", "--log-every", "1", "--train-num-points", "256"]
    assert tool.main(["--steps", "2", "--out", str(first), *common]) == 0
    # lr 0: the continued run changes no weight, so what it saved shows what --num-blocks did (and that
    # --bf16's autocast leaves the weights float32)
    assert tool.main(["--init", str(first), "--out", str(second), "--num-blocks", "3", "--steps", "2", "--lr", "0",
                      "--bf16",
                      "--anneal-start", "0", "--anneal-end", "0", "--save-every", "1", "--first-scene", "2",
                      *common]) == 0
    log = (second / "train_log.txt").read_text()
    assert log.startswith((first / "train_log.txt").read_text())  # the init model's history comes first
    assert "# saved the model after 1 steps" in log
    assert '"num_blocks": 3' in [line for line in log.splitlines() if line.startswith("# model")][-1]
    before = EomtFastForUniversalSegmentation.from_pretrained(first, backend="torch")
    after = EomtFastForUniversalSegmentation.from_pretrained(second, backend="torch")
    assert before.config.num_blocks == 2 and after.config.num_blocks == 3
    assert after.masking_probs() == (0.0, 0.0, 0.0)
    b, a = before.state_dict(), after.state_dict()
    assert set(a) == set(b) and all(t.dtype == torch.float32 for t in a.values())
    for name in b:
        if name != "attn_mask_probs":
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
