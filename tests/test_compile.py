"""torch.compile(model, fullgraph=True) works and follows attn_mask_probs changes."""

import pytest
import torch

from eomt_fast import EomtFastForUniversalSegmentation
from eomt_fast.testing import TEST_CONFIGS, random_hf_model

pytest.importorskip("transformers")


def test_fullgraph_compile_matches_eager_and_sees_new_probs():
    hf = random_hf_model(seed=21, dtype=torch.float32, attn_mask_probs=[1.0, 0.0], **TEST_CONFIGS["small_r4"])
    model = EomtFastForUniversalSegmentation.from_hf(hf, backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # no eager call before: load set the caches
    x = torch.randn(2, 3, 64, 64)
    got = compiled(x)
    expected = hf(x)
    torch.testing.assert_close(got.masks_queries_logits, expected.masks_queries_logits, rtol=1e-4, atol=1e-4)

    model.attn_mask_probs.zero_()
    assert model.masking_probs() == (0.0, 0.0)  # the documented refresh after changing the buffer
    hf.attn_mask_probs.zero_()
    torch.testing.assert_close(compiled(x).masks_queries_logits, hf(x).masks_queries_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(compiled(x).masks_queries_logits, got.masks_queries_logits)


def test_fullgraph_compile_returns_hidden_states_and_attentions():
    hf = random_hf_model(seed=22, dtype=torch.float32, attn_mask_probs=[1.0, 0.0], **TEST_CONFIGS["small_r4"])
    model = EomtFastForUniversalSegmentation.from_hf(hf, backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 64, 64)
    got = compiled(x, output_hidden_states=True, output_attentions=True)
    expected = model(x, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(expected.hidden_states) and len(got.attentions) == len(expected.attentions)
    for a, b in zip(got.hidden_states + got.attentions, expected.hidden_states + expected.attentions):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
