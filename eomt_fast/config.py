"""EomtFastConfig: every field of transformers' EomtConfig, validated, readable without transformers."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ACTIVATIONS = ("gelu",)  # exact erf GELU, what every released checkpoint uses


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
    def mlp_hidden_size(self) -> int:
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
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.mlp_hidden_size < 1:
            raise ConfigError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP for hidden_size {self.hidden_size}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not isinstance(self.use_swiglu_ffn, bool):
            raise ConfigError(f"use_swiglu_ffn must be true or false, got {self.use_swiglu_ffn!r}")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ConfigError(f"id2label keys must be 0..num_labels-1, got {sorted(self.id2label)}")

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> EomtFastConfig:
        """Build from a config.json dictionary (transformers' format). ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type == "eomt_dinov3":
            raise ConfigError(f"{source}: an EoMT-DINOv3 config (model_type 'eomt_dinov3', transformers' "
                              f"EomtDinov3ForUniversalSegmentation: rotary position embeddings, no absolute ones) "
                              f"is not supported; eomt_fast runs the DINOv2 EoMT models (model_type 'eomt')")
        if model_type != "eomt":
            raise ConfigError(f"{source}: not an EoMT config (model_type is {model_type!r}, expected 'eomt')")
        data = dict(data)
        if "id2label" not in data and "num_labels" in data:
            data["id2label"] = {i: f"LABEL_{i}" for i in range(int(data["num_labels"]))}
        data.pop("num_labels", None)
        data.pop("label2id", None)  # derived from id2label
        names = set(cls.field_names())
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        try:
            return cls(**known, extra=extra)
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
        """From a live ``transformers.EomtConfig``."""
        return cls.from_dict(hf_config.to_dict(), source=type(hf_config).__name__)

    def to_dict(self) -> dict[str, Any]:
        """A config.json dictionary that transformers' EomtConfig loads."""
        data: dict[str, Any] = dict(self.extra)
        for name in self.field_names():
            data[name] = getattr(self, name)
        data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        data["label2id"] = {v: k for k, v in self.id2label.items()}
        data["model_type"] = "eomt"
        data.setdefault("architectures", ["EomtForUniversalSegmentation"])
        return data

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
