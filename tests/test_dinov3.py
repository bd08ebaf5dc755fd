"""EoMT-DINOv3 (transformers' EomtDinov3ForUniversalSegmentation, model_type "eomt_dinov3"): rotary position
embeddings on the patch tokens, separate q/k/v/o projections whose biases may be absent, no absolute
position embeddings. The plain-PyTorch model against transformers (the oracle), the Triton backend against
the plain path, checkpoints both ways, and the config."""

import json

import pytest
import torch

from eomt_fast import EomtFastConfig, EomtFastForUniversalSegmentation, dispatch
from eomt_fast.checkpoint import absent_weights
from eomt_fast.config import ConfigError
from eomt_fast.testing import DINOV3_TEST_CONFIGS, MASKED_ERROR_SEEDS, low_precision_errors, random_hf_model

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "EomtDinov3ForUniversalSegmentation"):
    pytest.skip("this transformers has no EoMT-DINOv3", allow_module_level=True)

OUTPUTS = ("masks_queries_logits", "class_queries_logits", "last_hidden_state")
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}  # max |ours - hf| / max |hf|


def hf_model(name, seed=0, dtype=torch.float64, probs=None):
    return random_hf_model(seed=seed, dtype=dtype, attn_mask_probs=probs, model_type="eomt_dinov3",
                           **DINOV3_TEST_CONFIGS[name])


def relative_errors(ours, theirs) -> dict[str, float]:
    errors = {}
    for name in OUTPUTS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.isfinite(a).all(), name
        errors[name] = ((a - b).abs().max() / b.abs().max()).item()
    return errors


# (config, attn_mask_probs, batch): masking off, on, the reuse quirk, random unmasking; biases absent
CASES = [
    ("dinov3_r4", [1.0, 1.0], 2),
    ("dinov3_r4", [0.0, 0.0], 1),
    ("dinov3_r4", [1.0, 0.0], 2),
    ("dinov3_nobias_hd12", [0.5, 1.0, 0.0], 2),
    ("dinov3_nobias_hd12", [1.0, 1.0, 1.0], 1),
    ("dinov3_gated_silu", [1.0, 0.0], 2),
    ("dinov3_geglu_nobias", [1.0], 1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("name", "probs", "batch"), CASES, ids=[f"{n}-p{'_'.join(map(str, p))}-B{b}" for n, p, b in CASES])
def test_from_pretrained_matches_transformers(tmp_path, name, probs, batch, dtype):
    hf = hf_model(name, seed=len(name) + batch, dtype=dtype, probs=probs)
    hf.save_pretrained(tmp_path)
    ours = EomtFastForUniversalSegmentation.from_pretrained(tmp_path)
    assert ours.config.model_type == "eomt_dinov3" and ours.dtype == dtype
    size = hf.config.image_size
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    torch.manual_seed(123)  # fractional probs draw torch.rand(B, Q) per masked layer, same calls in both
    expected = hf(x)
    torch.manual_seed(123)
    errors = relative_errors(ours(x), expected)
    assert max(errors.values()) <= TOLERANCE[dtype], errors


def test_absent_biases_are_zeros_and_stay_absent(tmp_path):
    """No key bias (and, in this config, no q/v/o/MLP bias): zeros in the fused weights, never written back."""
    hf = hf_model("dinov3_nobias_hd12", seed=1)
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    layer, c = ours.layers[0], ours.config.hidden_size
    assert torch.equal(layer.qkv_bias, torch.zeros(3 * c, dtype=torch.float64))
    assert not ours.position_embeddings.any()
    ours.save_pretrained(tmp_path)
    saved = set(transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path).state_dict())
    assert saved == set(hf.state_dict())
    with open(tmp_path / "config.json") as f:
        data = json.load(f)
    assert data["model_type"] == "eomt_dinov3" and data["architectures"] == ["EomtDinov3ForUniversalSegmentation"]
    assert "mlp_ratio" not in data and "use_swiglu_ffn" not in data and data["key_bias"] is False


def test_absent_parts_are_made_on_the_checkpoints_device():
    """from_hf of a transformers model on a GPU: the zeros standing for the absent key bias are made where the
    checkpoint's tensors are (meta here stands for CUDA), or the fused bias' torch.cat would fail."""
    from eomt_fast.checkpoint import convert_hf_state_dict

    hf = hf_model("dinov3_r4", dtype=torch.bfloat16)
    state = {k: v.to("meta") for k, v in hf.state_dict().items()}
    weights = convert_hf_state_dict(state, EomtFastConfig.from_hf(hf.config))
    assert {w.device.type for w in weights.values()} == {"meta"}
    assert weights["layers.0.qkv_bias"].dtype == weights["position_embeddings"].dtype == torch.bfloat16


def test_save_pretrained_loads_in_transformers_with_the_same_outputs(tmp_path):
    hf = hf_model("dinov3_r4", seed=2, probs=[1.0, 0.0])
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    ours.save_pretrained(tmp_path)
    reloaded = transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    errors = relative_errors(ours(x), reloaded(x))
    assert max(errors.values()) <= 1e-9, errors


def test_random_weights_keep_absent_parts_zero(tmp_path):
    """A random-weight model: the parts the checkpoint format lacks are zero, so a save/load keeps its outputs."""
    config = EomtFastConfig.from_dict(dict(DINOV3_TEST_CONFIGS["dinov3_r4"], model_type="eomt_dinov3"))
    model = EomtFastForUniversalSegmentation(config).double()
    weights = dict(model.named_parameters())
    absent = absent_weights(config)
    assert {name for name, _, _ in absent} == {"position_embeddings"} | {f"layers.{i}.qkv_bias" for i in range(4)}
    for name, start, stop in absent:
        assert not weights[name][start:stop].any(), name
    model.save_pretrained(tmp_path)
    reloaded = EomtFastForUniversalSegmentation.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert torch.equal(model(x).masks_queries_logits, reloaded(x).masks_queries_logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("probs", [[0.0, 0.0], [1.0, 1.0]], ids=["unmasked", "masked"])
def test_low_precision_within_twice_transformers_error(dtype, probs):
    """As tests/test_parity.py's: masked, summed over several models (``MASKED_ERROR_SEEDS``)."""
    seeds = MASKED_ERROR_SEEDS if any(probs) else (9,)
    ours, theirs = low_precision_errors(dtype, seeds, attn_mask_probs=probs, model_type="eomt_dinov3",
                                        **DINOV3_TEST_CONFIGS["dinov3_r4"])
    for name in OUTPUTS:
        assert ours[name] <= 2 * theirs[name] + 1e-6, f"{name}: ours {ours[name]:.3g} vs transformers {theirs[name]:.3g}"


def test_hidden_states_and_attentions_match_transformers():
    hf = hf_model("dinov3_r4", seed=11, probs=[1.0, 0.0])
    ours = EomtFastForUniversalSegmentation.from_hf(hf)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = hf(x, output_hidden_states=True)
    got = ours(x, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(expected.hidden_states) == 5
    for index, (a, b) in enumerate(zip(got.hidden_states, expected.hidden_states)):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-9, index
    hf.set_attn_implementation("eager")
    eager = hf(x, output_attentions=True)
    for index, (a, b) in enumerate(zip(got.attentions, eager.attentions)):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-6, index


@pytest.mark.skipif(not (torch.cuda.is_available() or dispatch.triton_interpreting()),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name,probs", [("dinov3_r4", [1.0, 0.0]), ("dinov3_nobias_hd12", [0.0, 1.0, 1.0]),
                                        ("dinov3_gated_silu", [1.0, 1.0]), ("dinov3_geglu_nobias", [0.0])])
def test_triton_backend_matches_plain_path_fp32(name, probs):
    hf = hf_model(name, seed=13, dtype=torch.float32, probs=probs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = EomtFastForUniversalSegmentation.from_hf(hf, backend="torch").to(device)
    kernels = EomtFastForUniversalSegmentation.from_hf(hf.to(device), backend="triton")
    assert {p.op: p.impl for p in kernels.op_paths()}["rope"] == "triton"
    size = hf.config.image_size
    x = torch.randn(2, 3, size, size, device=device)
    errors = relative_errors(kernels(x), plain(x))
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"use_gated_mlp": "yes"}, "use_gated_mlp must be true or false"),
        ({"use_gated_mlp": True, "hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not supported"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 100.0}}, "rope_type 'linear' is not supported"),
        ({"rope_parameters": {"rope_theta": 0}}, "rope_theta must be a number > 0, got 0"),
        ({"rope_parameters": {"rope_theta": None}}, "rope_theta must be a number > 0, got None"),
        ({"rope_parameters": {"rope_theta": "100"}}, "rope_theta must be a number > 0, got '100'"),
        ({"rope_parameters": {"rope_theta": True}}, "rope_theta must be a number > 0, got True"),
        ({"hidden_size": 36, "num_attention_heads": 6}, "head_dim divisible by 4"),
        ({"key_bias": "no"}, "key_bias must be true or false"),
        ({"intermediate_size": 0}, "intermediate_size must be a positive int"),
    ],
)
def test_invalid_dinov3_configs_name_the_problem(changes, match):
    with pytest.raises(ConfigError, match=match):
        EomtFastConfig.from_dict({"model_type": "eomt_dinov3", **changes})


@pytest.mark.parametrize("name", sorted(DINOV3_TEST_CONFIGS))
def test_config_round_trip_against_transformers(name):
    """Every key of transformers' EomtDinov3Config.to_dict() survives from_dict -> to_dict, with the values."""
    hf = transformers.EomtDinov3Config(**DINOV3_TEST_CONFIGS[name])
    ours = EomtFastConfig.from_hf(hf)
    assert ours.model_type == "eomt_dinov3" and ours.mlp_hidden_size == hf.intermediate_size
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    theirs, back = hf.to_dict(), ours.to_dict()
    for key, value in theirs.items():
        if key in ("architectures", "id2label", "label2id"):
            continue
        assert back[key] == value, key
    assert transformers.EomtDinov3Config.from_dict(back).to_dict()["hidden_size"] == hf.hidden_size


def test_eomt_configs_carry_no_dinov3_fields():
    data = EomtFastConfig().to_dict()
    assert data["model_type"] == "eomt" and "rope_parameters" not in data and "key_bias" not in data
    assert data["architectures"] == ["EomtForUniversalSegmentation"]
    assert not EomtFastConfig().rope


def test_fullgraph_compile_matches_transformers():
    """torch.compile(fullgraph=True) of a DINOv3 model, no eager call before (the rotary tables are then
    computed inside the graph), and again after one (from the model's cache)."""
    hf = hf_model("dinov3_r4", seed=21, dtype=torch.float32, probs=[1.0, 0.0])
    model = EomtFastForUniversalSegmentation.from_hf(hf, backend="torch")
    x = torch.randn(2, 3, 64, 64)
    expected = hf(x)
    for _ in range(2):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x).masks_queries_logits, expected.masks_queries_logits, rtol=1e-4,
                                   atol=1e-4)
        model(x)  # fills the cache for the second round
        torch._dynamo.reset()


def test_cuda_graph_runner_logic_with_rotary_tables():
    """CudaGraphs' logic (capture replaced by capture_eagerly, as in tests/test_cuda_graphs.py) on a DINOv3 model:
    the rotary tables are made by the warm-up, outside the capture, and replays equal the eager forward; a
    cast drops the tables, and the runner (seeing the weights move) captures again with new ones."""
    from eomt_fast.cuda_graphs import CudaGraphs, capture_eagerly

    hf = hf_model("dinov3_r4", seed=31, dtype=torch.float32, probs=[1.0, 0.0])
    model = EomtFastForUniversalSegmentation.from_hf(hf, backend="torch")
    graphs = CudaGraphs(model, capture=capture_eagerly)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        got = graphs(x)
        assert torch.equal(got.masks_queries_logits, model(x).masks_queries_logits)
    assert list(model._rope_cache) == [(torch.device("cpu"), torch.float32)]
    generation = model.weights_generation
    model.double()
    assert not model._rope_cache and model.weights_generation > generation
    assert torch.equal(graphs(x.double()).masks_queries_logits, model(x.double()).masks_queries_logits)
    assert list(model._rope_cache) == [(torch.device("cpu"), torch.float64)]
