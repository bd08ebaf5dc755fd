"""The plain-PyTorch model against transformers' EomtForUniversalSegmentation (the oracle)."""

import pytest
import torch

from eomt_fast import EomtFastForUniversalSegmentation
from eomt_fast.testing import MASKED_ERROR_SEEDS, TEST_CONFIGS, low_precision_errors, random_hf_model

pytest.importorskip("transformers")

OUTPUTS = ("masks_queries_logits", "class_queries_logits", "last_hidden_state")
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}  # max |ours - hf| / max |hf|


def assert_outputs_close(ours, theirs, rel: float) -> None:
    for name in OUTPUTS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.isfinite(a).all(), name
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= rel, f"{name}: relative error {err:.3g} > {rel:g}"


# (config, attn_mask_probs, batch): masking off, on, mixed (the reuse quirk), fractional (random unmasking)
CASES = [
    ("hf_tiny", [1.0], 2),
    ("hf_tiny", [0.0], 1),
    ("small_r4", [0.0, 0.0], 3),
    ("small_r4", [1.0, 0.0], 3),  # layer 2 reuses layer 1's mask
    ("small_r4", [0.5, 1.0], 2),  # random unmasking of query rows
    ("r0_swiglu", [1.0, 0.3, 0.0], 2),
    ("r0_swiglu", [0.0, 0.0, 0.0], 1),
    ("hd64_up1", [1.0], 1),
    ("silu_r2", [1.0, 0.0], 2),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("name", "probs", "batch"), CASES, ids=[f"{n}-p{'_'.join(map(str, p))}-B{b}" for n, p, b in CASES])
def test_from_pretrained_matches_transformers(tmp_path, name, probs, batch, dtype):
    hf = random_hf_model(seed=len(name) + batch, dtype=dtype, attn_mask_probs=probs, **TEST_CONFIGS[name])
    hf.save_pretrained(tmp_path)
    ours = EomtFastForUniversalSegmentation.from_pretrained(tmp_path)
    assert ours.dtype == dtype
    size = hf.config.image_size
    pixel_values = torch.randn(batch, 3, size, size, dtype=dtype)
    torch.manual_seed(123)  # fractional probs draw torch.rand(B, Q) per masked layer, same calls in both
    expected = hf(pixel_values)
    torch.manual_seed(123)
    got = ours(pixel_values)
    assert_outputs_close(got, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("name", ["small_r4", "r0_swiglu"])
def test_relu_models_match_transformers(name):
    """hidden_act ReLU: in the MLP, the mask head and the upscale blocks; with use_swiglu_ffn transformers'
    SwiGLU stays SiLU, so only the heads change."""
    cfg = dict(TEST_CONFIGS[name], hidden_act="relu")
    hf = random_hf_model(seed=11, dtype=torch.float64, attn_mask_probs=[1.0] * cfg["num_blocks"], **cfg)
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    assert ours.config.activation == "relu"
    size = hf.config.image_size
    pixel_values = torch.randn(2, 3, size, size, dtype=torch.float64)
    assert_outputs_close(ours(pixel_values), hf(pixel_values), TOLERANCE[torch.float64])


def test_from_hf_matches_and_shares_nothing():
    hf = random_hf_model(seed=3, dtype=torch.float64, attn_mask_probs=[1.0, 1.0], **TEST_CONFIGS["small_r4"])
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    pixel_values = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_outputs_close(ours(pixel_values), hf(pixel_values), 1e-9)
    with torch.no_grad():  # a copy: changing the transformers model leaves ours alone
        hf.layers[0].norm1.weight.add_(1.0)
    assert not torch.equal(ours.layers[0].ln1_weight, hf.layers[0].norm1.weight)


def test_generator_drives_random_unmasking():
    hf = random_hf_model(seed=4, dtype=torch.float64, attn_mask_probs=[0.5, 0.5], **TEST_CONFIGS["small_r4"])
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    a = ours(x, generator=torch.Generator().manual_seed(7)).masks_queries_logits
    b = ours(x, generator=torch.Generator().manual_seed(7)).masks_queries_logits
    c = ours(x, generator=torch.Generator().manual_seed(8)).masks_queries_logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_num_blocks_zero_prepends_queries_after_the_last_layer():
    """transformers cannot run num_blocks=0 (predict() then reads patch tokens as queries and fails);
    here the queries enter after the last layer. Oracle: transformers' own modules composed that way."""
    cfg = dict(TEST_CONFIGS["small_r4"], num_blocks=0)
    hf = random_hf_model(seed=5, dtype=torch.float64, **cfg)
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        h = hf.embeddings(x)
        for layer in hf.layers:
            h = layer(h)
        h = hf.layernorm(torch.cat([hf.query.weight[None].expand(2, -1, -1), h], dim=1))
        masks, classes = hf.predict(h)
    out = ours(x)
    torch.testing.assert_close(out.last_hidden_state, h, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.masks_queries_logits, masks, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.class_queries_logits, classes, rtol=1e-9, atol=1e-12)


def test_num_blocks_equal_to_layers():
    cfg = dict(TEST_CONFIGS["small_r4"], num_blocks=4)
    hf = random_hf_model(seed=6, dtype=torch.float64, attn_mask_probs=[1.0, 0.0, 1.0, 0.0], **cfg)
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert_outputs_close(ours(x), hf(x), 1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("probs", [[0.0, 0.0], [1.0, 1.0]], ids=["unmasked", "masked"])
def test_low_precision_within_twice_transformers_error(dtype, probs):
    """Against the fp64 oracle, our bf16/fp16 error is at most twice transformers' own in that dtype (masked:
    summed over several models, see ``MASKED_ERROR_SEEDS``)."""
    seeds = MASKED_ERROR_SEEDS if any(probs) else (9,)
    ours, theirs = low_precision_errors(dtype, seeds, attn_mask_probs=probs, **TEST_CONFIGS["small_r4"])
    for name in OUTPUTS:
        assert ours[name] <= 2 * theirs[name] + 1e-6, f"{name}: ours {ours[name]:.3g} vs transformers {theirs[name]:.3g}"


# hidden states and attentions: masking on then reused, fractional with SwiGLU and no registers, masking off
RECORDING_CASES = [("small_r4", [1.0, 0.0], 2), ("r0_swiglu", [1.0, 0.3, 0.0], 2), ("hf_tiny", [0.0], 1)]
ATTENTION_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}  # transformers' eager softmax is float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("name", "probs", "batch"), RECORDING_CASES,
                         ids=[f"{n}-p{'_'.join(map(str, p))}-B{b}" for n, p, b in RECORDING_CASES])
def test_hidden_states_and_attentions_match_transformers(name, probs, batch, dtype):
    hf = random_hf_model(seed=11 + batch, dtype=dtype, attn_mask_probs=probs, **TEST_CONFIGS[name])
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    size = hf.config.image_size
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    torch.manual_seed(5)
    expected = hf(x, output_hidden_states=True)
    torch.manual_seed(5)
    got = ours(x, output_hidden_states=True, output_attentions=True)
    assert_outputs_close(got, expected, TOLERANCE[dtype])
    assert len(got.hidden_states) == len(expected.hidden_states) == hf.config.num_hidden_layers + 1
    for index, (a, b) in enumerate(zip(got.hidden_states, expected.hidden_states)):
        assert a.shape == b.shape and a.dtype == b.dtype, (index, a.shape, b.shape)
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= TOLERANCE[dtype], f"hidden_states[{index}]: relative error {err:.3g}"
    assert got.hidden_states[-1] is got.last_hidden_state  # as transformers ties them
    assert len({h.data_ptr() for h in got.hidden_states}) == len(got.hidden_states)  # copies, not the buffer

    hf.set_attn_implementation("eager")  # the only transformers attention that returns its weights
    torch.manual_seed(5)
    eager = hf(x, output_attentions=True)
    assert len(got.attentions) == len(eager.attentions) == hf.config.num_hidden_layers
    for index, (a, b) in enumerate(zip(got.attentions, eager.attentions)):
        assert a.shape == b.shape and a.dtype == b.dtype, (index, a.shape, b.shape)
        err = (a - b).abs().max().item()  # probabilities: at most 1
        assert err <= ATTENTION_TOLERANCE[dtype], f"attentions[{index}]: error {err:.3g}"
        assert torch.equal(a == 0, b == 0) or dtype == torch.float32, index  # the same masked pairs


def test_hidden_states_start_with_the_queries_when_every_layer_has_them():
    """num_blocks == num_hidden_layers: transformers' first hidden state is layer 0's input, queries included."""
    cfg = dict(TEST_CONFIGS["small_r4"], num_blocks=4)
    hf = random_hf_model(seed=6, dtype=torch.float64, attn_mask_probs=[1.0, 0.0, 1.0, 0.0], **cfg)
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    expected, got = hf(x, output_hidden_states=True), ours(x, output_hidden_states=True)
    assert [h.shape for h in got.hidden_states] == [h.shape for h in expected.hidden_states]
    for a, b in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_tuple_and_mapping_order_match_transformers():
    """return_dict=False and iteration: transformers appends hidden_states and attentions after patch_offsets."""
    hf = random_hf_model(seed=12, dtype=torch.float64, attn_mask_probs=[1.0, 0.0], attn_implementation="eager",
                         **TEST_CONFIGS["small_r4"])
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    offsets = [torch.tensor([0, 0, 64]), torch.tensor([1, 0, 64])]
    for kwargs in ({}, {"output_hidden_states": True}, {"output_attentions": True},
                   {"output_hidden_states": True, "output_attentions": True}):
        expected = hf(x, patch_offsets=offsets, **kwargs)
        got = ours(x, patch_offsets=offsets, **kwargs)
        assert list(got) == list(expected) == got.keys(), kwargs
        assert len(got) == len(expected) and ("hidden_states" in got) == ("hidden_states" in expected)
        assert got.get("loss") is None and [k for k, _ in got.items()] == list(expected.keys())
        theirs, mine = hf(x, patch_offsets=offsets, return_dict=False, **kwargs), \
            ours(x, patch_offsets=offsets, return_dict=False, **kwargs)
        assert [type(v) for v in mine] == [type(v) for v in theirs], kwargs
        assert mine[3] is offsets and theirs[3] is offsets  # patch_offsets before the recorded outputs
        for a, b in zip(got.values(), expected.values()):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # eager: a float32 softmax


def test_untied_last_hidden_state_is_the_last_layers_output():
    """config.json "tie_last_hidden_states": false (read by transformers 5.24): hidden_states[-1] is the last
    layer's own output, before the final LayerNorm. Oracle: that output, hooked from transformers' last layer."""
    cfg = dict(TEST_CONFIGS["small_r4"], tie_last_hidden_states=False)
    hf = random_hf_model(seed=13, dtype=torch.float64, attn_mask_probs=[1.0, 1.0], **cfg)
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    assert ours.config.extra["tie_last_hidden_states"] is False
    captured = []
    hf.layers[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = hf(x, output_hidden_states=True)
    got = ours(x, output_hidden_states=True)
    assert len(got.hidden_states) == len(expected.hidden_states)
    raw = captured[-1][0] if isinstance(captured[-1], tuple) else captured[-1]
    torch.testing.assert_close(got.hidden_states[-1], raw, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got.hidden_states[-1], got.last_hidden_state)
    for a, b in zip(got.hidden_states[:-1], expected.hidden_states[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    empty = ours(x[:0], output_hidden_states=True)
    assert [h.shape[1:] for h in empty.hidden_states] == [h.shape[1:] for h in got.hidden_states]


def test_flags_from_a_saved_config_json(tmp_path):
    hf = random_hf_model(seed=14, dtype=torch.float32, **TEST_CONFIGS["hf_tiny"])
    hf.config.output_hidden_states = True
    hf.save_pretrained(tmp_path)
    ours = EomtFastForUniversalSegmentation.from_pretrained(tmp_path)
    x = torch.randn(1, 3, hf.config.image_size, hf.config.image_size)
    got, expected = ours(x), hf(x)
    assert expected.hidden_states is not None and len(got.hidden_states) == len(expected.hidden_states)
    assert ours(x, output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_attentions_within_twice_transformers_error(dtype):
    hf64 = random_hf_model(seed=15, dtype=torch.float64, attn_mask_probs=[1.0, 0.0], attn_implementation="eager",
                           **TEST_CONFIGS["small_r4"])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    truth = EomtFastForUniversalSegmentation.from_hf(hf64)(x, output_attentions=True).attentions  # float64 softmax
    hf_low = random_hf_model(seed=15, dtype=dtype, attn_mask_probs=[1.0, 0.0], attn_implementation="eager",
                             **TEST_CONFIGS["small_r4"])
    theirs = hf_low(x.to(dtype), output_attentions=True).attentions
    got = EomtFastForUniversalSegmentation.from_hf(hf_low)(x.to(dtype), output_attentions=True).attentions
    for index, (ref, a, b) in enumerate(zip(truth, got, theirs)):
        assert a.dtype == dtype
        our_err, their_err = (a.double() - ref).abs().mean().item(), (b.double() - ref).abs().mean().item()
        assert our_err <= 2 * their_err + 1e-6, f"attentions[{index}]: ours {our_err:.3g} vs transformers {their_err:.3g}"
