"""EomtFastConfig: every EomtConfig field, validated with clear messages."""

import pytest

from eomt_fast import ConfigError, EomtFastConfig
from eomt_fast.testing import TEST_CONFIGS

pytest.importorskip("transformers")


def test_has_every_eomt_config_field():
    from transformers import EomtConfig

    hf_fields = set(vars(EomtConfig).get("__annotations__", {}))  # the fields EomtConfig itself declares
    assert "num_register_tokens" in hf_fields
    missing = sorted(hf_fields - set(EomtFastConfig.field_names()))
    assert not missing, missing


def test_defaults_match_transformers():
    from transformers import EomtConfig

    ours, theirs = EomtFastConfig(), EomtConfig().to_dict()
    for name in EomtFastConfig.field_names():
        if name != "id2label":
            assert getattr(ours, name) == theirs[name], name


@pytest.mark.parametrize("name", sorted(TEST_CONFIGS))
def test_round_trip_through_transformers(name, tmp_path):
    from transformers import EomtConfig

    hf = EomtConfig(**TEST_CONFIGS[name])
    ours = EomtFastConfig.from_hf(hf)
    assert ours.num_labels == hf.num_labels and ours.id2label == hf.id2label
    ours.to_json_file(tmp_path / "config.json")
    back = EomtConfig.from_pretrained(tmp_path)
    for key, value in TEST_CONFIGS[name].items():
        assert getattr(back, key) == value, key
    reread = EomtFastConfig.from_json_file(tmp_path / "config.json")
    # a live config's architectures is None; what is written names the class, as transformers' save_pretrained
    assert reread.extra.pop("architectures") == ["EomtForUniversalSegmentation"]
    assert ours.extra.pop("architectures") is None
    assert reread == ours


def test_unknown_keys_survive_a_round_trip():
    config = EomtFastConfig.from_dict({"model_type": "eomt", "transformers_version": "5.0", "my_note": [1, 2]})
    assert config.to_dict()["my_note"] == [1, 2]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"hidden_size": 100, "num_attention_heads": 16}, r"hidden_size \(100\) must be divisible by num_attention_heads \(16\)"),
        ({"image_size": 100, "patch_size": 16}, r"image_size \(100\) must be divisible by patch_size \(16\)"),
        ({"num_blocks": 30}, r"num_blocks \(30\) cannot exceed num_hidden_layers \(24\)"),
        ({"num_blocks": -1}, "num_blocks must be an int >= 0"),
        ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not supported; supported: gelu, silu, relu"),
        ({"num_queries": 0}, "num_queries must be a positive int"),
        ({"hidden_size": "1024"}, "hidden_size must be a positive int"),
        ({"image_size": [640, 480]}, r"image_size must be an int or a square"),
        ({"mlp_ratio": 0}, "mlp_ratio must be a positive number"),
        ({"use_swiglu_ffn": "yes"}, "use_swiglu_ffn must be true or false"),
        ({"layer_norm_eps": 0}, "layer_norm_eps must be > 0"),
        ({"num_upscale_blocks": -2}, "num_upscale_blocks must be an int >= 0"),
        ({"id2label": {"0": "a", "2": "b"}}, "id2label keys must be 0..num_labels-1"),
    ],
)
def test_invalid_configs_name_the_problem(changes, match):
    with pytest.raises(ConfigError, match=match):
        EomtFastConfig.from_dict({"model_type": "eomt", **changes})


def test_not_an_eomt_config():
    with pytest.raises(ConfigError, match="not an EoMT config"):
        EomtFastConfig.from_dict({"model_type": "mask2former"})


def test_square_pairs_and_num_labels():
    config = EomtFastConfig.from_dict({"model_type": "eomt", "image_size": [32, 32], "patch_size": (8, 8),
                                       "num_labels": 3, "num_blocks": 1, "num_hidden_layers": 2})
    assert config.image_size == 32 and config.grid_size == 4 and config.num_labels == 3


def test_swiglu_hidden_size():
    assert EomtFastConfig(hidden_size=1536, num_attention_heads=24, use_swiglu_ffn=True).mlp_hidden_size == 4096


def test_supported_activations_are_the_kernels():
    """Every hidden_act the config accepts has a reference and a GEMM epilogue in the kernels."""
    from eomt_fast.config import SUPPORTED_ACTIVATIONS
    from eomt_fast.kernels import gemm, linear

    assert SUPPORTED_ACTIVATIONS == tuple(linear.ACTIVATION_REFS)
    assert set(SUPPORTED_ACTIVATIONS) <= set(gemm.ACTIVATIONS)


@pytest.mark.parametrize(
    "fields,activation,mlp_activation",
    [
        ({}, "gelu", "gelu"),
        ({"hidden_act": "relu"}, "relu", "relu"),
        ({"use_swiglu_ffn": True, "hidden_act": "relu"}, "relu", "silu"),  # EomtSwiGLUFFN is SiLU regardless
        ({"model_type": "eomt_dinov3", "use_gated_mlp": True, "hidden_act": "gelu"}, "gelu", "gelu"),  # GeGLU
        ({"model_type": "eomt_dinov3", "use_gated_mlp": True, "hidden_act": "silu"}, "silu", "silu"),
    ],
)
def test_activation_of_each_part(fields, activation, mlp_activation):
    config = EomtFastConfig.from_dict({"model_type": "eomt", **fields})
    assert (config.activation, config.mlp_activation) == (activation, mlp_activation)
