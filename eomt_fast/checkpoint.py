"""Checkpoint files and key names: transformers' EoMT format in, the model's prepared weights out.

The model stores its weights in the layout its kernels want (fused QKV, fused SwiGLU gate/up,
channels-last transposed-conv weights, flattened patch weights), prepared once at load. ``weight_rules``
is the single table that maps those weights to and from transformers' key names, so loading and
``save_pretrained`` are each other's inverse.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import EomtFastConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_BIN_NAME = "pytorch_model.bin"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"  # the image processor's settings (eomt_fast.processing)
IGNORED_KEYS = ("criterion.empty_weight",)  # the training loss' class weights
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


@dataclass(frozen=True)
class Rule:
    """One model weight and the transformers tensors it is made of.

    kind: "copy" (same tensor), "reshape" (same data, other shape), "cat" (the hf tensors concatenated
    on dim 0, e.g. q/k/v -> qkv), "convt" (ConvTranspose2d (C_in, C_out, 2, 2) -> (2, 2, C_out, C_in): the GEMM's (N, K) weight).
    A ``None`` among ``hf_names`` is a part the checkpoint does not hold (EoMT-DINOv3's absent key bias,
    its absent position embeddings): zeros of that shape in the model, nothing written back.
    """

    name: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: str = "copy"

    def to_model(self, tensors: list[torch.Tensor | None], like: torch.Tensor | None = None) -> torch.Tensor:
        """The model's weight from the hf tensors (None for a part the checkpoint does not hold: zeros of
        ``like``'s dtype and device, the checkpoint's; float32 on the CPU without it)."""
        kind = {"dtype": like.dtype, "device": like.device} if like is not None else {"dtype": torch.float32}
        tensors = [t if t is not None else torch.zeros(shape, **kind) for t, shape in zip(tensors, self.hf_shapes)]
        if self.kind == "copy":
            return tensors[0]
        if self.kind == "reshape":
            return tensors[0].reshape(self.model_shape)
        if self.kind == "cat":
            return torch.cat(tensors, dim=0)
        if self.kind == "convt":
            return tensors[0].permute(2, 3, 1, 0).contiguous()
        raise AssertionError(self.kind)

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The hf tensors, in ``hf_names`` order (absent parts included: the caller drops them)."""
        if self.kind == "copy":
            return [tensor]
        if self.kind == "reshape":
            return [tensor.reshape(self.hf_shapes[0])]
        if self.kind == "cat":
            return list(torch.split(tensor, [s[0] for s in self.hf_shapes], dim=0))
        if self.kind == "convt":
            return [tensor.permute(3, 2, 0, 1)]
        raise AssertionError(self.kind)

    def absent_rows(self) -> list[tuple[int, int]]:
        """(start, stop) ranges along dim 0 of the model's weight that the checkpoint does not hold."""
        ranges, start = [], 0
        for name, shape in zip(self.hf_names, self.hf_shapes):
            stop = start + shape[0] if self.kind == "cat" else self.model_shape[0]
            if name is None:
                ranges.append((start, stop))
            start = stop
        return ranges

    @property
    def model_shape(self) -> tuple[int, ...]:
        if self.kind == "copy":
            return self.hf_shapes[0]
        if self.kind == "reshape":
            return _RESHAPED[self.name.rsplit(".", 1)[-1]](self.hf_shapes[0])
        if self.kind == "cat":
            return (sum(s[0] for s in self.hf_shapes), *self.hf_shapes[0][1:])
        if self.kind == "convt":
            c_in, c_out, kh, kw = self.hf_shapes[0]
            return (kh, kw, c_out, c_in)
        raise AssertionError(self.kind)


_RESHAPED: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "patch_weight": lambda s: (s[0], s[1] * s[2] * s[3]),  # Conv2d (C, ch, p, p) -> GEMM (C, ch*p*p)
    "cls_token": lambda s: (s[-1],),  # (1, 1, C) -> (C,)
    "register_tokens": lambda s: (s[1], s[2]),  # (1, R, C) -> (R, C)
}


def weight_rules(config: EomtFastConfig) -> list[Rule]:
    """Every weight of the model, in transformers 5.x key names and shapes (EomtForUniversalSegmentation's,
    or EomtDinov3ForUniversalSegmentation's for ``model_type`` eomt_dinov3)."""
    c, p, ch = config.hidden_size, config.patch_size, config.num_channels
    hidden = config.mlp_hidden_size
    patch = "embeddings.patch_embeddings" + ("" if config.rope else ".projection")
    rules = [
        Rule("patch_weight", (f"{patch}.weight",), ((c, ch, p, p),), "reshape"),
        Rule("patch_bias", (f"{patch}.bias",), ((c,),)),
        # EoMT-DINOv3 has rotary embeddings instead: zeros here (the patch kernel adds them in its epilogue)
        Rule("position_embeddings", (None if config.rope else "embeddings.position_embeddings.weight",),
             ((config.num_patches, c),)),
        Rule("cls_token", ("embeddings.cls_token",), ((1, 1, c),), "reshape"),
        Rule("register_tokens", ("embeddings.register_tokens",), ((1, config.num_register_tokens, c),), "reshape"),
        Rule("query", ("query.weight",), ((config.num_queries, c),)),
        Rule("norm_weight", ("layernorm.weight",), ((c,),)),
        Rule("norm_bias", ("layernorm.bias",), ((c,),)),
        Rule("class_weight", ("class_predictor.weight",), ((config.num_labels + 1, c),)),
        Rule("class_bias", ("class_predictor.bias",), ((config.num_labels + 1,),)),
    ]
    for j in (1, 2, 3):
        rules.append(Rule(f"mask_head.fc{j}_weight", (f"mask_head.fc{j}.weight",), ((c, c),)))
        rules.append(Rule(f"mask_head.fc{j}_bias", (f"mask_head.fc{j}.bias",), ((c,),)))
    for j in range(config.num_upscale_blocks):
        hf = f"upscale_block.block.{j}"
        rules += [
            Rule(f"upscale.{j}.convt_weight", (f"{hf}.conv1.weight",), ((c, c, 2, 2),), "convt"),
            Rule(f"upscale.{j}.convt_bias", (f"{hf}.conv1.bias",), ((c,),)),
            Rule(f"upscale.{j}.dw_weight", (f"{hf}.conv2.weight",), ((c, 1, 3, 3),)),
            Rule(f"upscale.{j}.ln_weight", (f"{hf}.layernorm2d.weight",), ((c,),)),
            Rule(f"upscale.{j}.ln_bias", (f"{hf}.layernorm2d.bias",), ((c,),)),
        ]
    def bias(name: str, present: str) -> str | None:
        return name if config.has_bias(present) else None

    out_proj = "o_proj" if config.rope else "out_proj"
    for i in range(config.num_hidden_layers):
        hf, m = f"layers.{i}", f"layers.{i}"
        qkv = tuple(f"{hf}.attention.{x}_proj" for x in "qkv")
        qkv_biases = tuple(bias(f"{n}.bias", f"{x}_bias") for n, x in zip(qkv, ("query", "key", "value")))
        rules += [
            Rule(f"{m}.ln1_weight", (f"{hf}.norm1.weight",), ((c,),)),
            Rule(f"{m}.ln1_bias", (f"{hf}.norm1.bias",), ((c,),)),
            Rule(f"{m}.qkv_weight", tuple(f"{n}.weight" for n in qkv), ((c, c),) * 3, "cat"),
            Rule(f"{m}.qkv_bias", qkv_biases, ((c,),) * 3, "cat"),
            Rule(f"{m}.out_weight", (f"{hf}.attention.{out_proj}.weight",), ((c, c),)),
            Rule(f"{m}.out_bias", (bias(f"{hf}.attention.{out_proj}.bias", "proj_bias"),), ((c,),)),
            Rule(f"{m}.ls1", (f"{hf}.layer_scale1.lambda1",), ((c,),)),
            Rule(f"{m}.ln2_weight", (f"{hf}.norm2.weight",), ((c,),)),
            Rule(f"{m}.ln2_bias", (f"{hf}.norm2.bias",), ((c,),)),
            Rule(f"{m}.ls2", (f"{hf}.layer_scale2.lambda1",), ((c,),)),
        ]
        if config.gated_mlp:  # EomtSwiGLUFFN, EomtDinov3GatedMLP: fc1 = [gate | up]
            gate_up = (f"{hf}.mlp.gate_proj", f"{hf}.mlp.up_proj")
            rules += [
                Rule(f"{m}.fc1_weight", tuple(f"{n}.weight" for n in gate_up), ((hidden, c),) * 2, "cat"),
                Rule(f"{m}.fc1_bias", tuple(bias(f"{n}.bias", "mlp_bias") for n in gate_up), ((hidden,),) * 2, "cat"),
                Rule(f"{m}.fc2_weight", (f"{hf}.mlp.down_proj.weight",), ((c, hidden),)),
                Rule(f"{m}.fc2_bias", (bias(f"{hf}.mlp.down_proj.bias", "mlp_bias"),), ((c,),)),
            ]
        elif config.rope:  # EomtDinov3MLP
            rules += [
                Rule(f"{m}.fc1_weight", (f"{hf}.mlp.up_proj.weight",), ((hidden, c),)),
                Rule(f"{m}.fc1_bias", (bias(f"{hf}.mlp.up_proj.bias", "mlp_bias"),), ((hidden,),)),
                Rule(f"{m}.fc2_weight", (f"{hf}.mlp.down_proj.weight",), ((c, hidden),)),
                Rule(f"{m}.fc2_bias", (bias(f"{hf}.mlp.down_proj.bias", "mlp_bias"),), ((c,),)),
            ]
        else:
            rules += [
                Rule(f"{m}.fc1_weight", (f"{hf}.mlp.fc1.weight",), ((hidden, c),)),
                Rule(f"{m}.fc1_bias", (f"{hf}.mlp.fc1.bias",), ((hidden,),)),
                Rule(f"{m}.fc2_weight", (f"{hf}.mlp.fc2.weight",), ((c, hidden),)),
                Rule(f"{m}.fc2_bias", (f"{hf}.mlp.fc2.bias",), ((c,),)),
            ]
    return rules


def absent_weights(config: EomtFastConfig) -> list[tuple[str, int, int]]:
    """(model weight name, start, stop): the rows along dim 0 that the checkpoint format does not hold and
    that must stay zero (saving drops them), e.g. EoMT-DINOv3's key bias and position embeddings."""
    return [(rule.name, start, stop) for rule in weight_rules(config) for start, stop in rule.absent_rows()]


def _rename_v4_swiglu(state: dict[str, torch.Tensor], config: EomtFastConfig) -> dict[str, torch.Tensor]:
    """transformers 4.x stored a SwiGLU MLP as mlp.weights_in (gate rows, then up rows) and mlp.weights_out.

    transformers 5.x silently re-initialises such weights at random; here they become gate/up/down.
    """
    if not config.use_swiglu_ffn or not any(".mlp.weights_in." in k or ".mlp.weights_out." in k for k in state):
        return state
    out = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(layers\.\d+\.mlp)\.weights_(in|out)\.(weight|bias)", key)
        if match is None:
            out[key] = tensor
        elif match.group(2) == "out":
            out[f"{match.group(1)}.down_proj.{match.group(3)}"] = tensor
        else:
            if tensor.shape[0] % 2:
                raise CheckpointError(f"{key}: expected an even number of rows (gate, then up), got {tuple(tensor.shape)}")
            gate, up = tensor.chunk(2, dim=0)
            out[f"{match.group(1)}.gate_proj.{match.group(3)}"] = gate
            out[f"{match.group(1)}.up_proj.{match.group(3)}"] = up
    return out


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_hf_state_dict(
    state: dict[str, torch.Tensor], config: EomtFastConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """transformers state dict (5.x or 4.x names) -> the model's weights, plus ``attn_mask_probs``.

    Missing, unexpected and mis-shaped keys are one error that lists them all.
    """
    state = _rename_v4_swiglu(dict(state), config)
    rules = weight_rules(config)
    expected = {name: shape for rule in rules for name, shape in zip(rule.hf_names, rule.hf_shapes) if name}
    expected_probs = (config.num_blocks,)
    problems = []
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in IGNORED_KEYS and k != "attn_mask_probs")
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    )
    if "attn_mask_probs" in state and tuple(state["attn_mask_probs"].shape) != expected_probs:
        misshaped.append(f"attn_mask_probs {tuple(state['attn_mask_probs'].shape)} (expected {expected_probs})")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_listing(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))
    like = state[rules[0].hf_names[0]]  # the patch weight: absent parts are zeros of its dtype, on its device
    weights = {rule.name: rule.to_model([state[n] if n else None for n in rule.hf_names], like) for rule in rules}
    probs = state.get("attn_mask_probs")
    weights["attn_mask_probs"] = torch.ones(config.num_blocks) if probs is None else probs.float()
    return weights


def to_hf_state_dict(weights: dict[str, torch.Tensor], config: EomtFastConfig) -> dict[str, torch.Tensor]:
    """The model's weights -> a transformers 5.x state dict (with the loss buffer, so nothing is missing)."""
    state = {}
    for rule in weight_rules(config):
        for name, tensor in zip(rule.hf_names, rule.to_hf(weights[rule.name])):
            if name is not None:  # a part the checkpoint format does not hold (zeros in the model)
                state[name] = tensor
    state["attn_mask_probs"] = weights["attn_mask_probs"]
    empty_weight = torch.ones(config.num_labels + 1, dtype=torch.float32)
    empty_weight[-1] = config.no_object_weight
    state["criterion.empty_weight"] = empty_weight
    return state


# ---- files --------------------------------------------------------------------------------------
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "data" / "default_model"


def default_model_dir() -> Path:
    """The bundled default model: a small EoMT trained on generated scenes (``tools/train_default_model.py``)."""
    if not (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR} (an install without "
                                "package data?); pass --model DIR")
    return DEFAULT_MODEL_DIR


HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only")  # passed to huggingface_hub, as transformers


def resolve_directory(path_or_hub_id: str | os.PathLike, weights: bool = True, **hub_options: Any) -> Path:
    """A local directory, or a Hub id fetched with huggingface_hub (needs the Hub to be reachable, or
    ``local_files_only=True`` and a cached copy). From the Hub come config.json, preprocessor_config.json
    and, with ``weights``, one weight format: model.safetensors, or the shards its index names, or
    pytorch_model.bin only when the repository has neither. ``hub_options``: revision, token, cache_dir, local_files_only."""
    unknown = sorted(set(hub_options) - set(HUB_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown} (Hub options: {', '.join(HUB_OPTIONS)})")
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path}: expected a model directory (config.json + weights), got a file")
    name = os.fspath(path_or_hub_id)
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {name}")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(
            f"{name!r} is not a local directory, and loading Hub ids needs huggingface_hub: "
            "pip install 'eomt-fast[hf]'"
        ) from None
    options = {k: v for k, v in hub_options.items() if v is not None}

    def fetch(patterns: list[str], **pinned: Any) -> Path:
        try:
            return Path(huggingface_hub.snapshot_download(repo_id=name, allow_patterns=patterns,
                                                          **{**options, **pinned}))
        except Exception as exc:  # offline, unknown repo, gated, ...: one clear message
            raise OSError(
                f"could not fetch {name!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
                "If this machine has no network, download the model elsewhere and pass its directory."
            ) from exc

    metadata = [CONFIG_NAME, PREPROCESSOR_CONFIG_NAME]
    if not weights:
        return fetch(metadata)
    # the top-level weights only, never variants (model.fp16.safetensors) or subfolders (onnx/...); later
    # fetches are pinned to the commit of the first (the snapshot folder's name) should the branch move
    local = fetch(metadata + [SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME])
    if (local / SAFETENSORS_NAME).is_file():
        return local
    index = local / SAFETENSORS_INDEX_NAME
    if index.is_file():  # sharded: exactly the shards its weight_map names
        return fetch(sorted(set(_read_weight_map(index).values())), revision=local.name)
    return fetch([PYTORCH_BIN_NAME], revision=local.name)  # an older repository: its PyTorch weights


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors weights (truncated or corrupt?): {exc}") from None


def _read_weight_map(index: Path) -> dict[str, str]:
    """A sharded safetensors index's weight_map: parameter name -> shard file name."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map (weight_map is a "
                              f"{type(weight_map).__name__})")
    return weight_map


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read model.safetensors, a sharded safetensors index, or pytorch_model.bin (weights_only)."""
    single, index, pt_bin = directory / SAFETENSORS_NAME, directory / SAFETENSORS_INDEX_NAME, directory / PYTORCH_BIN_NAME
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        weight_map = _read_weight_map(index)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{index} names the shard {shard}, which does not exist")
            state.update(_read_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index}: keys listed in the index are not in its shards: {_listing(missing)}")
        return state
    if pt_bin.is_file():
        try:
            return torch.load(pt_bin, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{pt_bin}: cannot read PyTorch weights (truncated or corrupt?): {exc}") from None
    raise FileNotFoundError(
        f"{directory}: no weights found (expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_BIN_NAME})"
    )


def read_config(directory: Path) -> EomtFastConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
    return EomtFastConfig.from_json_file(path)


def write_checkpoint(directory: str | os.PathLike, config: EomtFastConfig, state: dict[str, torch.Tensor]) -> Path:
    """config.json + model.safetensors in transformers' format."""
    from safetensors.torch import save_file

    directory = Path(os.fspath(directory))
    directory.mkdir(parents=True, exist_ok=True)
    config.to_json_file(directory / CONFIG_NAME)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, os.fspath(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    return directory
