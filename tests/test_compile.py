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
