"""Bad input gets a clear error naming the problem; good input is never modified."""

import pytest
import torch

from eomt_fast import EomtFastConfig, EomtFastForUniversalSegmentation
from eomt_fast.testing import TEST_CONFIGS


@pytest.fixture(scope="module")
def model():
    config = EomtFastConfig.from_dict(dict(TEST_CONFIGS["small_r4"], model_type="eomt"))
    torch.manual_seed(0)
    return EomtFastForUniversalSegmentation(config)


@pytest.mark.parametrize(
    ("pixel_values", "error", "match"),
    [
        (torch.randn(3, 64, 64), ValueError, r"4-D \(batch, 3, 64, 64\), got shape \(3, 64, 64\)"),
        (torch.randn(1, 1, 3, 64, 64), ValueError, "4-D"),
        (torch.randn(1, 4, 64, 64), ValueError, "4 channels, the model expects 3"),
        (torch.randn(1, 3, 64, 48), ValueError, "64x48, the model expects 64x64"),
        (torch.randn(1, 3, 32, 32), ValueError, "32x32, the model expects 64x64"),
        (torch.randint(0, 255, (1, 3, 64, 64)), TypeError, "floating-point.*torch.int64"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "torch.uint8"),
        (torch.randn(1, 3, 64, 64, device="meta"), ValueError, "on meta but the model is on cpu"),
        ([[1.0]], TypeError, "must be a torch.Tensor, got list"),
    ],
    ids=["3d", "5d", "channels", "not-square", "wrong-size", "int64", "uint8", "other-device", "list"],
)
def test_bad_pixel_values(model, pixel_values, error, match):
    with pytest.raises(error, match=match):
        model(pixel_values)


def test_empty_batch_returns_empty_outputs(model):
    out = model(torch.empty(0, 3, 64, 64))
    cfg = model.config
    assert out.masks_queries_logits.shape == (0, cfg.num_queries, model.mask_size, model.mask_size)
    assert out.class_queries_logits.shape == (0, cfg.num_queries, cfg.num_labels + 1)
    assert out.last_hidden_state.shape == (0, cfg.num_queries + 1 + cfg.num_register_tokens + cfg.num_patches,
                                           cfg.hidden_size)


def test_inputs_are_not_modified(model):
    x = torch.randn(2, 3, 64, 64)
    before = x.clone()
    offsets = [torch.tensor([0, 0, 64])]
    out = model(x, patch_offsets=offsets)
    assert torch.equal(x, before)
    assert out.patch_offsets is offsets  # passed through untouched


def test_other_float_dtypes_are_cast_like_transformers(model):
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x.double()).masks_queries_logits, model(x).masks_queries_logits)


def test_output_behaves_like_a_model_output(model):
    out = model(torch.randn(1, 3, 64, 64))
    assert out["masks_queries_logits"] is out.masks_queries_logits
    assert out.keys() == ["class_queries_logits", "masks_queries_logits", "last_hidden_state"]
    assert out[0] is out.class_queries_logits and out.loss is None


def test_unknown_backend(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        EomtFastForUniversalSegmentation(model.config, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter(model, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    triton_model = EomtFastForUniversalSegmentation(model.config, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_model(torch.randn(1, 3, 64, 64))


def test_masking_probs_follow_buffer_changes(model):
    model.attn_mask_probs.fill_(1.0)
    assert model.masking_probs() == (1.0, 1.0)
    model.attn_mask_probs[1] = 0.0
    assert model.masking_probs() == (1.0, 0.0)
    model.attn_mask_probs.fill_(1.0)
