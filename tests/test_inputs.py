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
    assert list(out) == out.keys() and len(out) == 3 and "loss" not in out and out.get("loss", 7) == 7
    assert dict(out.items()) == dict(zip(out.keys(), out.values())) and dict(**out).keys() == set(out.keys())
    with pytest.raises(KeyError):
        out["hidden_states"]  # None, so not a key (as in transformers)


def test_unknown_backend(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        EomtFastForUniversalSegmentation(model.config, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter(model, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    triton_model = EomtFastForUniversalSegmentation(model.config, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("ON", True), ("yes", True),
                                           ("0", False), ("false", False), ("off", False), ("2", False), ("", False)])
def test_interpreter_flag_read_as_triton_reads_it(monkeypatch, value, on):
    """"TRITON_INTERPRET=false" must not send CPU tensors to kernels Triton compiled for a GPU, nor
    "TRITON_INTERPRET=true" refuse the interpreter Triton turned on."""
    from eomt_fast.kernels._triton import HAS_TRITON, triton_interpreting

    if not HAS_TRITON:
        pytest.skip("needs Triton (without it nothing is interpreted)")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreting() is on


def test_masking_probs_follow_buffer_changes(model):
    model.attn_mask_probs.fill_(1.0)
    assert model.masking_probs() == (1.0, 1.0)
    model.attn_mask_probs[1] = 0.0
    assert model.masking_probs() == (1.0, 0.0)
    model.attn_mask_probs.fill_(1.0)


def test_return_dict_false_gives_the_tuple(model):
    x = torch.randn(1, 3, 64, 64)
    out, tup = model(x), model(x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 3
    for a, b in zip(tup, out.to_tuple()):
        assert torch.equal(a, b)
    hs = model(x, output_hidden_states=True, return_dict=False)
    assert len(hs) == 4 and len(hs[3]) == model.config.num_hidden_layers + 1  # hidden_states after the three


def test_forward_flags_default_to_the_checkpoints_config():
    """As transformers: output_hidden_states / output_attentions / return_dict in config.json are the defaults."""
    data = dict(TEST_CONFIGS["small_r4"], model_type="eomt", output_hidden_states=True, output_attentions=True,
                return_dict=False)
    model = EomtFastForUniversalSegmentation(EomtFastConfig.from_dict(data))
    x = torch.randn(1, 3, 64, 64)
    class_logits, mask_logits, last, hidden, attentions = model(x)
    assert len(hidden) == model.config.num_hidden_layers + 1 and hidden[-1] is last
    assert len(attentions) == model.config.num_hidden_layers
    out = model(x, output_hidden_states=False, output_attentions=False, return_dict=True)
    assert out.hidden_states is None and out.attentions is None and torch.equal(out.masks_queries_logits, mask_logits)


def test_empty_batch_with_hidden_states_and_attentions(model):
    cfg = model.config
    full = model(torch.randn(1, 3, 64, 64), output_hidden_states=True, output_attentions=True)
    empty = model(torch.empty(0, 3, 64, 64), output_hidden_states=True, output_attentions=True)
    assert [h.shape[1:] for h in empty.hidden_states] == [h.shape[1:] for h in full.hidden_states]
    assert [a.shape[1:] for a in empty.attentions] == [a.shape[1:] for a in full.attentions]
    assert all(t.shape[0] == 0 for t in empty.hidden_states + empty.attentions)
    assert empty.hidden_states[-1] is empty.last_hidden_state and len(empty.attentions) == cfg.num_hidden_layers


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_hidden_states": [0, -1]}, TypeError, r"output_hidden_states must be True or False, got \[0, -1\]"),
        ({"output_attentions": 1}, TypeError, "output_attentions must be True or False, got 1"),
        ({"return_dict": "yes"}, TypeError, "return_dict must be True or False"),
        ({"mask_labels": [torch.zeros(1, 64, 64)]}, ValueError, "inference only"),
        ({"class_labels": [torch.zeros(1, dtype=torch.long)]}, ValueError, "inference only"),
    ],
    ids=["hidden-list", "attentions-int", "return-dict-str", "mask-labels", "class-labels"],
)
def test_bad_forward_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model(torch.randn(1, 3, 64, 64), **kwargs)


def test_forward_positional_order_is_transformers():
    """A call written for transformers' forward(pixel_values, mask_labels, class_labels, patch_offsets, **kwargs)
    binds the same way here; what transformers takes as keyword arguments is keyword-only."""
    import inspect

    from transformers import EomtForUniversalSegmentation

    def positional(fn):
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]

    theirs = positional(EomtForUniversalSegmentation.forward)
    assert positional(EomtFastForUniversalSegmentation.forward) == theirs
    assert theirs == ["self", "pixel_values", "mask_labels", "class_labels", "patch_offsets"]


def test_positional_patch_offsets(model):
    x = torch.randn(1, 3, 64, 64)
    offsets = [torch.tensor([0, 0, 64])]
    assert model(x, None, None, offsets).patch_offsets is offsets
    with pytest.raises(ValueError, match="inference only"):  # the second positional is mask_labels, as there
        model(x, offsets)
    with pytest.raises(TypeError):
        model(x, None, None, offsets, torch.Generator())  # generator is keyword-only


def test_null_flags_in_config_json_mean_the_default(model):
    """transformers writes null for an unset flag (to_diff_dict); null means its default, not an error."""
    extra = dict(model.config.extra)
    model.config.extra.update(output_hidden_states=None, output_attentions=None, return_dict=None,
                              tie_last_hidden_states=None)
    try:
        out = model(torch.randn(1, 3, 64, 64))
        assert out.hidden_states is None and out.attentions is None and not isinstance(out, tuple)
        hs = model(torch.randn(1, 3, 64, 64), output_hidden_states=True)
        assert hs.hidden_states[-1] is hs.last_hidden_state  # tied, the default
    finally:
        model.config.extra.clear()
        model.config.extra.update(extra)
