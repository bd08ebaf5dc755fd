"""EomtFastConfig: every field of transformers' EomtConfig (and EomtDinov3Config), validated, readable
without transformers."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

# hidden_act values as transformers' ACT2FN computes them, which the kernels apply (kernels.linear.ACTIVATION_REFS):
# "gelu" the exact erf GELU, what every released checkpoint uses; "silu"; "relu"
SUPPORTED_ACTIVATIONS = ("gelu", "silu", "relu")
MODEL_TYPES = ("eomt", "eomt_dinov3")  # transformers' EomtForUniversalSegmentation, EomtDinov3ForUniversalSegmentation
ARCHITECTURES = {"eomt": "EomtForUniversalSegmentation", "eomt_dinov3": "EomtDinov3ForUniversalSegmentation"}
# the fields only one of the two configs has (EomtDinov3Config refuses mlp_ratio and use_swiglu_ffn)
EOMT_ONLY_FIELDS = ("mlp_ratio", "use_swiglu_ffn")
DINOV3_ONLY_FIELDS = ("intermediate_size", "rope_parameters", "query_bias", "key_bias", "value_bias", "proj_bias",
                      "mlp_bias", "use_gated_mlp", "pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")
DINOV3_BIASES = ("query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias")
DEFAULT_ROPE_THETA = 100.0  # EomtDinov3Config.default_theta


class ConfigError(ValueError):
    """A config that does not describe a model eomt_fast can run."""


def _square(name: str, value: Any) -> int:
    """image_size / patch_size may be an int or an (h, w) pair; the model needs a square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{name} must be an int or a square (h, h) pair, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    return value


@dataclass
class EomtFastConfig:
    """The architecture of an EoMT model: the fields of ``transformers.EomtConfig`` with its defaults.

    Defaults describe EoMT-L/640 (COCO panoptic). Loss-only fields (weights, point sampling) are kept
    so that a config survives a load/save round trip unchanged. Unknown keys of a config.json are kept
    in ``extra`` and written back by ``to_dict``.

    ``model_type="eomt_dinov3"`` describes transformers' EomtDinov3ForUniversalSegmentation (a DINOv3
    backbone): rotary position embeddings on the patch tokens instead of absolute ones, separate q/k/v/o
    projections whose biases may be absent (``*_bias``), the MLP width given as ``intermediate_size``. Its
    fields (``DINOV3_ONLY_FIELDS``, EomtDinov3Config's defaults) are read and written only for that type,
    ``mlp_ratio`` and ``use_swiglu_ffn`` only for ``eomt``.
    """

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int = 640
    patch_size: int = 16
    num_channels: int = 3
    mlp_ratio: float = 4
    layerscale_value: float = 1.0
    drop_path_rate: float = 0.0
    num_upscale_blocks: int = 2
    attention_dropout: float = 0.0
    use_swiglu_ffn: bool = False
    num_blocks: int = 4
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    num_queries: int = 200
    num_register_tokens: int = 4
    id2label: dict[int, str] | None = None
    model_type: str = "eomt"
    # eomt_dinov3 only
    intermediate_size: int = 4096
    rope_parameters: dict[str, Any] | None = None  # {"rope_type": "default", "rope_theta": ...}
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    use_gated_mlp: bool = False
    pos_embed_shift: float | None = None  # the three pos_embed_*: RoPE coordinate augmentation in training only
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = 2.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.id2label is None:
            self.id2label = {0: "LABEL_0", 1: "LABEL_1"}  # transformers' default: two labels
        try:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"id2label must map integer ids to names, got {self.id2label!r}") from exc
        self.image_size = _square("image_size", self.image_size)
        self.patch_size = _square("patch_size", self.patch_size)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + registers."""
        return 1 + self.num_register_tokens

    @property
    def rope(self) -> bool:
        """Rotary position embeddings on the patch tokens' queries and keys (EoMT-DINOv3), no absolute ones."""
        return self.model_type == "eomt_dinov3"

    @property
    def rope_theta(self) -> float:
        """rope_parameters' rope_theta (or an older config's top-level rope_theta), else 100."""
        params = self.rope_parameters or {}
        return params.get("rope_theta", self.extra.get("rope_theta", DEFAULT_ROPE_THETA))

    @property
    def gated_mlp(self) -> bool:
        """The MLP is gated, down(act(gate) * up) (fc1 holds the gate rows, then the up rows)."""
        return self.use_swiglu_ffn if self.model_type == "eomt" else self.use_gated_mlp

    @property
    def activation(self) -> str:
        """The activation of the (ungated) MLP, the mask head and the upscale blocks: hidden_act."""
        return self.hidden_act

    @property
    def mlp_activation(self) -> str:
        """The activation inside the MLP: of the gate when it is gated (EoMT's SwiGLU is SiLU whatever hidden_act
        says; EoMT-DINOv3's gated MLP applies hidden_act), else hidden_act."""
        return "silu" if self.model_type == "eomt" and self.use_swiglu_ffn else self.hidden_act

    def has_bias(self, name: str) -> bool:
        """Whether the checkpoint holds that bias (``query_bias``, ..., ``mlp_bias``): always for eomt."""
        return self.model_type == "eomt" or getattr(self, name)

    @property
    def mlp_hidden_size(self) -> int:
        if self.model_type == "eomt_dinov3":
            return self.intermediate_size
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def first_query_layer(self) -> int:
        """Index of the first layer that carries the query tokens (== num_hidden_layers when num_blocks is 0)."""
        return self.num_hidden_layers - self.num_blocks

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")

        def non_negative_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
                     "num_channels", "num_queries"):
            positive_int(name)
        for name in ("num_upscale_blocks", "num_blocks", "num_register_tokens"):
            non_negative_int(name)
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.num_blocks > self.num_hidden_layers:
            raise ConfigError(
                f"num_blocks ({self.num_blocks}) cannot exceed num_hidden_layers ({self.num_hidden_layers})"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.model_type == "eomt_dinov3":
            self._validate_dinov3()
        else:
            if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
                raise ConfigError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
            if self.mlp_hidden_size < 1:
                raise ConfigError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP for hidden_size {self.hidden_size}")
            if not isinstance(self.use_swiglu_ffn, bool):
                raise ConfigError(f"use_swiglu_ffn must be true or false, got {self.use_swiglu_ffn!r}")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ConfigError(f"id2label keys must be 0..num_labels-1, got {sorted(self.id2label)}")

    def _validate_dinov3(self) -> None:
        size = self.intermediate_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"intermediate_size must be a positive int, got {size!r}")
        for name in (*DINOV3_BIASES, "use_gated_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        params = self.rope_parameters
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"rope_parameters must be an object, got {params!r}")
        rope_type = (params or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"rope_parameters rope_type {rope_type!r} is not supported (EoMT-DINOv3 has 'default')")
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ConfigError(f"rope_theta must be a number > 0, got {theta!r}")
        if self.head_dim % 4:  # two axes, each rotating head_dim / 4 pairs
            raise ConfigError(f"rotary position embeddings need head_dim divisible by 4, got {self.head_dim}")

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def field_names(cls, model_type: str = "eomt") -> tuple[str, ...]:
        """The config.json keys of that model type that are fields here (``model_type`` itself is not)."""
        other = DINOV3_ONLY_FIELDS if model_type == "eomt" else EOMT_ONLY_FIELDS
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "model_type", *other))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> EomtFastConfig:
        """Build from a config.json dictionary (transformers' format). ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: not an EoMT config (model_type is {model_type!r}, expected one of "
                              f"{', '.join(map(repr, MODEL_TYPES))})")
        data = dict(data)
        data.pop("model_type")
        if "id2label" not in data and "num_labels" in data:
            data["id2label"] = {i: f"LABEL_{i}" for i in range(int(data["num_labels"]))}
        data.pop("num_labels", None)
        data.pop("label2id", None)  # derived from id2label
        names = set(cls.field_names(model_type))
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        try:
            return cls(**known, model_type=model_type, extra=extra)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EomtFastConfig:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_hf(cls, hf_config: Any) -> EomtFastConfig:
        """From a live ``transformers.EomtConfig`` (or ``EomtDinov3Config``)."""
        return cls.from_dict(hf_config.to_dict(), source=type(hf_config).__name__)

    def to_dict(self) -> dict[str, Any]:
        """A config.json dictionary that transformers' EomtConfig (EomtDinov3Config) loads."""
        data: dict[str, Any] = dict(self.extra)
        for name in self.field_names(self.model_type):
            data[name] = getattr(self, name)
        data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        data["label2id"] = {v: k for k, v in self.id2label.items()}
        data["model_type"] = self.model_type
        if not data.get("architectures"):  # absent, or None (a live config's to_dict before any save)
            data["architectures"] = [ARCHITECTURES[self.model_type]]
        return data

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
