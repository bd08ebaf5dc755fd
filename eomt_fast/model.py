"""EomtFastForUniversalSegmentation: EoMT inference, the same outputs as transformers' model.

The forward is written as a sequence of the fused ops of ``eomt_fast.kernels`` (see ``dispatch.OPS``);
each runs its plain-PyTorch reference or, where ``dispatch`` says so, its Triton kernel.
Weights are kept in the layout the ops want (``checkpoint.weight_rules``), prepared once at load.

The residual stream lives in one (B, Q + 1 + R + P, C) token buffer per forward: the patch embedding writes
the patch rows, CLS and registers are copied into theirs, the layers before the queries run on the view
``tokens[:, Q:]`` (rows (Q + 1 + R + P) * C apart between images, which the kernels address as such), the
queries are then written into ``tokens[:, :Q]``, and the last NB layers run on the whole buffer. Each
layer updates it in place (``out=`` of the residual ops): no concatenation, no copy of the stream.
Loaded with ``cuda_graphs="auto"`` (the default) or ``True``, the forward is captured per input shape and
replayed on CUDA (``eomt_fast.cuda_graphs``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import checkpoint, dispatch
from .config import MODEL_TYPES, EomtFastConfig
from .kernels.attention import attention_probabilities
from .kernels.rope import rope_tables_ref

if TYPE_CHECKING:
    from .cuda_graphs import Capture, CudaGraphs

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def indexed_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device; a bare "cuda" gets the current CUDA device's index (0 without CUDA), as
    torch.cuda.set_device and the timers that work on one device need."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a torch floating dtype, or its name ("bfloat16", "bf16", "float32", ...)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of float32, float64, float16, bfloat16, got {dtype!r}")


@dataclass
class EomtFastOutput:
    """The fields of transformers' EomtForUniversalSegmentationOutput. ``loss`` is always None (an inference
    model); ``hidden_states`` and ``attentions`` are filled when asked for (``output_hidden_states=True``,
    ``output_attentions=True``), as transformers fills them."""

    loss: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    patch_offsets: list[torch.Tensor] | None = None

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        """The fields that are not None, in transformers' order: hidden_states and attentions come last, after
        patch_offsets, as transformers adds them to its output once the forward has returned it."""
        order = [f.name for f in fields(self) if f.name not in _RECORDED] + list(_RECORDED)
        return [name for name in order if getattr(self, name) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.keys())

    # the rest of transformers' ModelOutput (an OrderedDict): iteration gives the keys
    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def values(self) -> list[Any]:
        return list(self.to_tuple())


_RECORDED = ("hidden_states", "attentions")  # the outputs filled on request


Ops = dict  # op name -> implementation, from dispatch.resolve


def _alias(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """An argument that transformers names otherwise: either spelling, not two different values."""
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise ValueError(f"{name}={value!r} and {alias}={alias_value!r} disagree; pass one of them")
    return alias_value


def _as_device(value: Any, name: str) -> torch.device:
    """A device argument: a torch.device, a name ("cuda:1"), or a GPU index as transformers takes it."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name}={value!r}: a GPU index must be >= 0")
        return torch.device("cuda", value)
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r} is not a device")
    try:
        return torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"{name}={value!r} is not a device ({exc})") from None


def _load_device(device: Any, device_map: Any) -> Any:
    """``device``, or transformers' ``device_map`` when it names one device ("cuda", "cuda:1", 0, a
    torch.device, {"": device}). Both given: they must agree, "cuda" agreeing with any "cuda:N" (the
    spelling with the index wins)."""
    if device_map is None:
        return device
    given = device_map
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, dict) or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map={given!r}: EomtFastForUniversalSegmentation runs on one device; "
                         "pass device='cuda' (or device_map='cuda:0')")
    mapped = _as_device(device_map, "device_map")
    if device is None:
        return mapped
    device = _as_device(device, "device")
    if device.type != mapped.type or None not in (device.index, mapped.index) and device.index != mapped.index:
        raise ValueError(f"device={device!r} and device_map={given!r} disagree; pass one of them")
    return device if device.index is not None else mapped


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


@dataclass
class Recording:
    """What a forward collects when asked: hidden states and attention probabilities, in layer order."""

    hidden_states: list[torch.Tensor] | None = None
    attentions: list[torch.Tensor] | None = None
    tie_last: bool = True  # hidden_states[-1] is last_hidden_state (else the last layer's own output)

    @classmethod
    def requested(cls, hidden_states: bool, attentions: bool, tie_last: bool = True) -> Recording | None:
        if not (hidden_states or attentions):
            return None
        return cls([] if hidden_states else None, [] if attentions else None, tie_last)

    def fill(self, out: EomtFastOutput) -> EomtFastOutput:
        return dataclasses.replace(
            out,
            hidden_states=tuple(self.hidden_states) if self.hidden_states is not None else None,
            attentions=tuple(self.attentions) if self.attentions is not None else None,
        )


class EncoderLayer(nn.Module):
    """One pre-norm ViT layer with LayerScale; weights in the fused layout (qkv, a gated MLP's gate_up as fc1)."""

    def __init__(self, config: EomtFastConfig) -> None:
        super().__init__()
        c, hidden = config.hidden_size, config.mlp_hidden_size
        fc1_rows = 2 * hidden if config.gated_mlp else hidden
        self.gated_mlp = config.gated_mlp
        self.mlp_activation = config.mlp_activation
        self.num_heads = config.num_attention_heads
        self.eps = config.layer_norm_eps
        self.ln1_weight, self.ln1_bias = _weight(c), _weight(c)
        self.qkv_weight, self.qkv_bias = _weight(3 * c, c), _weight(3 * c)
        self.out_weight, self.out_bias = _weight(c, c), _weight(c)
        self.ls1 = _weight(c)
        self.ln2_weight, self.ln2_bias = _weight(c), _weight(c)
        self.fc1_weight, self.fc1_bias = _weight(fc1_rows, c), _weight(fc1_rows)
        self.fc2_weight, self.fc2_bias = _weight(c, hidden), _weight(c)
        self.ls2 = _weight(c)

    def forward(self, x: torch.Tensor, query_patch_mask: torch.Tensor | None, patch_start: int, ops: Ops,
                attentions: list[torch.Tensor] | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Updates x (B, S, C), a view of the model's token buffer, in place, and returns it. With a list as
        ``attentions``, appends this layer's (B, heads, S, S) attention probabilities to it. ``rope``: the
        (cos, sin) tables of EoMT-DINOv3's rotary embeddings, applied to the patch tokens' q and k."""
        qkv = ops["layernorm_qkv"](x, self.ln1_weight, self.ln1_bias, self.eps, self.qkv_weight, self.qkv_bias)
        if rope is not None:
            ops["rope"](qkv, rope[0], rope[1], self.num_heads, out=qkv)  # in place: qkv is this layer's own
        if attentions is not None:
            attentions.append(attention_probabilities(qkv, self.num_heads, query_patch_mask, patch_start))
        attn = ops["attention"](qkv, self.num_heads, query_patch_mask, patch_start)
        ops["out_projection"](attn, self.out_weight, self.out_bias, self.ls1, x, out=x)
        mlp = ops["layernorm_swiglu"] if self.gated_mlp else ops["layernorm_mlp"]
        return mlp(x, self.ln2_weight, self.ln2_bias, self.eps, self.fc1_weight, self.fc1_bias,
                   self.fc2_weight, self.fc2_bias, self.ls2, self.mlp_activation, out=x)


class MaskHead(nn.Module):
    def __init__(self, config: EomtFastConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.activation = config.activation
        for j in (1, 2, 3):
            setattr(self, f"fc{j}_weight", _weight(c, c))
            setattr(self, f"fc{j}_bias", _weight(c))

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops["mask_head"](x, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias,
                             self.fc3_weight, self.fc3_bias, self.activation)


class UpscaleBlock(nn.Module):
    """ConvTranspose 2x2 -> act (hidden_act) -> depthwise 3x3 -> LayerNorm, channels-last."""

    def __init__(self, config: EomtFastConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.eps = 1e-6  # EomtLayerNorm2d's eps, fixed in transformers (not layer_norm_eps)
        self.activation = config.activation
        self.convt_weight, self.convt_bias = _weight(2, 2, c, c), _weight(c)  # (2, 2, C_out, C_in): prepare_convt_weight
        self.dw_weight = _weight(c, 1, 3, 3)
        self.ln_weight, self.ln_bias = _weight(c), _weight(c)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops["upscale"](x, self.convt_weight, self.convt_bias, self.dw_weight,
                                 self.ln_weight, self.ln_bias, self.eps, self.activation)


def _weights_may_have_moved(module: EomtFastForUniversalSegmentation, incompatible_keys: Any) -> None:
    module._note_weight_pointers()  # load_state_dict(assign=True) replaces the tensors; a plain one copies


def _check_cuda_graphs_choice(value: Any) -> None:
    if value is not True and value is not False and not (isinstance(value, str) and value == "auto"):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {value!r}")


class EomtFastForUniversalSegmentation(nn.Module):
    """EoMT for panoptic, instance and semantic segmentation (inference).

    Build it with ``from_pretrained`` (a transformers checkpoint directory or Hub id) or ``from_hf`` (a live
    ``transformers.EomtForUniversalSegmentation``, or ``EomtDinov3ForUniversalSegmentation``: see
    ``EomtFastConfig.model_type``); ``EomtFastForUniversalSegmentation(config)`` gives random weights.
    ``model(pixel_values)`` returns the fields transformers returns, so transformers'
    ``EomtImageProcessor.post_process_*`` work on them unchanged.
    """

    def __init__(self, config: EomtFastConfig, backend: str = "auto") -> None:
        super().__init__()
        self._cuda_graphs: CudaGraphs | None = None  # first: _apply (.to(), .half(), ...) reads it
        self._rope_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}  # _apply too
        if not isinstance(config, EomtFastConfig):
            raise TypeError(f"config must be an EomtFastConfig, got {type(config).__name__}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, dispatch.BACKENDS))}, got {backend!r}")
        self.config = config
        self.backend = backend
        c = config.hidden_size
        self.patch_weight = _weight(c, config.num_channels * config.patch_size**2)
        self.patch_bias = _weight(c)
        self.position_embeddings = _weight(config.num_patches, c)
        self.cls_token = _weight(c)
        self.register_tokens = _weight(config.num_register_tokens, c)
        self.query = _weight(config.num_queries, c)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm_weight, self.norm_bias = _weight(c), _weight(c)
        self.class_weight, self.class_bias = _weight(config.num_labels + 1, c), _weight(config.num_labels + 1)
        self.mask_head = MaskHead(config)
        self.upscale = nn.ModuleList(UpscaleBlock(config) for _ in range(config.num_upscale_blocks))
        self.register_buffer("attn_mask_probs", torch.ones(config.num_blocks))
        self._probs_key: tuple[int, int, int] | None = None
        self._probs: tuple[float, ...] = (1.0,) * config.num_blocks  # what reset_parameters sets
        self._ops_key: tuple | None = None
        self._ops: Ops = {}
        self.reset_parameters()
        # the tensors' addresses a CUDA graph reads: bumped when moving, casting or load_state_dict(assign=True)
        # re-creates them (CudaGraphs then captures again instead of replaying into freed memory)
        self.weights_generation = 0
        self._weights_ptrs = self._weight_pointers()
        self.register_load_state_dict_post_hook(_weights_may_have_moved)

    # ---- construction ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random weights in the spirit of transformers' init (for demos and tests, not training):
        GEMM and conv weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embeddings N(0, 1), LayerNorm and
        LayerScale near their identity values, biases N(0, 0.02)."""
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("bias"):
                param.normal_(0.0, 0.02, generator=generator)
            elif leaf.startswith(("ln", "norm")):
                param.normal_(1.0, 0.02, generator=generator)
            elif leaf.startswith("ls"):
                param.normal_(self.config.layerscale_value, 0.02, generator=generator)
            elif leaf in ("position_embeddings", "query", "cls_token", "register_tokens"):
                param.normal_(0.0, 1.0, generator=generator)
            else:
                fan_in = 9 if leaf == "dw_weight" else param.shape[-1]  # convt_weight's last dim: C_in
                bound = 1.0 / math.sqrt(fan_in)
                param.uniform_(-bound, bound, generator=generator)
        weights = dict(self.named_parameters())
        for name, start, stop in checkpoint.absent_weights(self.config):  # e.g. EoMT-DINOv3's key bias
            weights[name][start:stop].zero_()
        self.attn_mask_probs.fill_(1.0)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        cuda_graphs: bool | str = "auto",
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        device_map: torch.device | str | int | None = None,
    ) -> EomtFastForUniversalSegmentation:
        """Load a transformers EoMT checkpoint: a directory with config.json and model.safetensors (or a
        sharded index, or pytorch_model.bin), or a Hub id. dtype None keeps the stored dtype.
        ``cuda_graphs``: ``"auto"`` (the default) replays CUDA graphs where they can run, from the second call
        of an input shape on (up to 4 shapes), and runs eager elsewhere (off CUDA included, so a model moved to
        CUDA later gets them too); ``True`` captures every shape on its first call and makes any call a graph cannot run an
        error; ``False``: eager forwards only. See ``enable_cuda_graphs``.
        ``revision``, ``token``, ``cache_dir``, ``local_files_only``: for Hub ids, as in transformers.
        transformers' names are accepted too: ``torch_dtype`` for ``dtype`` ("auto": the stored dtype, as
        None), ``device_map`` for ``device`` (one device: the model is never split)."""
        _check_cuda_graphs_choice(cuda_graphs)
        dtype, torch_dtype = (None if d == "auto" else d for d in (dtype, torch_dtype))  # "auto": the stored dtype
        dtype = _alias("dtype", parse_dtype(dtype), "torch_dtype", parse_dtype(torch_dtype))
        device = _load_device(device, device_map)
        directory = checkpoint.resolve_directory(path_or_hub_id, revision=revision, token=token, cache_dir=cache_dir,
                                                 local_files_only=local_files_only)
        config = checkpoint.read_config(directory)
        state = checkpoint.read_state_dict(directory)
        return cls._from_state(config, state, device, dtype, backend, source=str(directory), cuda_graphs=cuda_graphs)

    @classmethod
    def from_hf(
        cls,
        hf_model: nn.Module,
        backend: str = "auto",
        cuda_graphs: bool | str = "auto",
    ) -> EomtFastForUniversalSegmentation:
        """Copy a live transformers EomtForUniversalSegmentation or EomtDinov3ForUniversalSegmentation (same
        device and dtype); ``cuda_graphs`` as in ``from_pretrained``."""
        _check_cuda_graphs_choice(cuda_graphs)
        if not hasattr(hf_model, "config") or getattr(hf_model.config, "model_type", None) not in MODEL_TYPES:
            raise TypeError("from_hf expects a transformers EomtForUniversalSegmentation or "
                            f"EomtDinov3ForUniversalSegmentation, got {type(hf_model).__name__}")
        config = EomtFastConfig.from_hf(hf_model.config)
        state = {k: v.detach() for k, v in hf_model.state_dict().items()}
        param = next(hf_model.parameters())
        return cls._from_state(config, state, param.device, param.dtype, backend, source=type(hf_model).__name__,
                               cuda_graphs=cuda_graphs)

    @classmethod
    def _from_state(cls, config, state, device, dtype, backend, source,
                    cuda_graphs: bool | str) -> EomtFastForUniversalSegmentation:
        weights = checkpoint.convert_hf_state_dict(state, config, source=source)
        if dtype is None:
            stored = {t.dtype for k, t in weights.items() if k != "attn_mask_probs" and t.is_floating_point()}
            dtype = stored.pop() if len(stored) == 1 else torch.float32
        device = torch.device(device) if device is not None else torch.device("cpu")
        dispatch.check_backend(backend, device, config)
        with torch.device("meta"):
            model = cls(config, backend=backend)
        model.to_empty(device=device).to(dtype)
        model.load_weights(weights)
        model.ops()  # resolve the ops once at load (a compiled forward uses them as they are)
        if cuda_graphs:  # True or "auto"
            model.enable_cuda_graphs(auto=cuda_graphs == "auto")
        return model

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy prepared weights (``checkpoint.convert_hf_state_dict``) into the model, in its dtype."""
        own = dict(self.named_parameters())
        own["attn_mask_probs"] = self.attn_mask_probs
        if set(own) != set(weights):
            raise checkpoint.CheckpointError(f"weights do not match the model: {sorted(set(own) ^ set(weights))}")
        for name, target in own.items():
            target.copy_(weights[name])
        self.masking_probs()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors that transformers' from_pretrained loads back."""
        weights = dict(self.named_parameters())
        weights["attn_mask_probs"] = self.attn_mask_probs
        config = dataclasses.replace(self.config, extra={**self.config.extra, "dtype": str(self.dtype).removeprefix("torch.")})
        return checkpoint.write_checkpoint(directory, config, checkpoint.to_hf_state_dict(weights, config))

    # ---- CUDA graphs ---------------------------------------------------------------------------------
    def enable_cuda_graphs(self, clone_outputs: bool = True, capture: Capture | None = None, *, auto: bool = False,
                           max_graphs: int | None = None) -> None:
        """From now on ``model(...)`` replays a CUDA graph captured per input shape (and attn_mask_probs):
        see ``eomt_fast.cuda_graphs.CudaGraphs``. The outputs are clones that later calls leave alone;
        ``clone_outputs=False`` returns the graph's own output buffers instead, which the next call of the
        same shape overwrites. Raises on a model that is not on CUDA or has parameters that require grad.
        Moving or casting the model (``.to()``, ``.half()``, ...) drops the captured graphs. ``capture``
        replaces the CUDA-graph capture (``cuda_graphs.capture_eagerly``: the same logic on any device, for
        tests and debugging).

        ``auto=True`` (``cuda_graphs="auto"``, the loaders' default) raises none of those errors: a call a graph
        does not serve (off CUDA, inside the caller's own capture or a dispatch mode, while attn_mask_probs
        unmasks at random, a shape's first call) runs eager; ``max_graphs`` shapes (default 4) get graphs, later
        new shapes run eager."""
        from .cuda_graphs import CudaGraphs

        recorded = [f"{name}=True" for name in ("output_hidden_states", "output_attentions") if self._flag(name, None, False)]
        if recorded and not auto:  # every plain call would then run uncaptured (auto: quietly eager)
            raise ValueError(f"the model's config (its config.json) sets {' and '.join(recorded)}, which CUDA graphs "
                             "do not capture: set them to false in config.json, or load without cuda_graphs=True, set "
                             "model.config.extra[...] = False, then call enable_cuda_graphs() (ask per call instead)")
        self._cuda_graphs = CudaGraphs(self, clone_outputs=clone_outputs, capture=capture, auto=auto,
                                       max_graphs=max_graphs)

    def disable_cuda_graphs(self) -> None:
        """Back to eager forwards; the captured graphs and their memory are released."""
        self._cuda_graphs = None

    @property
    def cuda_graphs(self) -> CudaGraphs | None:
        """The CUDA-graph runner ``model(...)`` goes through, or None (eager forwards)."""
        return self._cuda_graphs

    def _apply(self, *args: Any, **kwargs: Any):
        # moving or casting re-creates the parameters: a captured graph would read freed memory
        result = super()._apply(*args, **kwargs)
        self._rope_cache.clear()
        self._note_weight_pointers()
        if self._cuda_graphs is not None:
            self._cuda_graphs.clear()
        return result

    def _weight_pointers(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in itertools.chain(self.parameters(), self.buffers()))

    def _note_weight_pointers(self) -> None:
        """Bump ``weights_generation`` when a parameter or buffer now lives at another address."""
        if hasattr(self, "_weights_ptrs"):  # not before __init__ has recorded the first addresses
            pointers = self._weight_pointers()
            if pointers != self._weights_ptrs:
                self._weights_ptrs = pointers
                self.weights_generation += 1

    # ---- properties --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_weight.device

    @property
    def mask_size(self) -> int:
        """Side of the mask logits: grid_size * 2**num_upscale_blocks."""
        return self.config.grid_size * 2**self.config.num_upscale_blocks

    def op_paths(self) -> list[dispatch.OpPath]:
        """Which implementation each op runs for this model's backend, device and dtype, and why."""
        return dispatch.plan(self.backend, self.device, self.dtype, self.config)

    def ops(self) -> Ops:
        """op name -> implementation, resolved again only when backend, device or dtype change.

        Under torch.compile the ops resolved by the last eager call (or at load) are used: resolving
        imports modules, which a compiled graph cannot trace. Call the model once eagerly after moving it
        to another device or dtype before compiling it."""
        if torch.compiler.is_compiling() and self._ops:
            return self._ops
        key = (self.backend, self.device, self.dtype)
        if key != self._ops_key:
            self._ops = dispatch.resolve(*key, self.config)
            self._ops_key = key
        return self._ops

    def masking_probs(self) -> tuple[float, ...]:
        """attn_mask_probs on the host, read again only when the buffer changes (no sync per forward).

        Under torch.compile the values read by the last eager call (or at load) are used, and the compiled
        graph is specialised on them: after changing attn_mask_probs, call ``masking_probs()`` (or the
        model once eagerly) so that the next compiled call sees the new values and recompiles."""
        if torch.compiler.is_compiling():
            return self._probs
        buf = self.attn_mask_probs
        key = (buf.data_ptr(), buf._version, buf.numel())
        if key != self._probs_key:
            self._probs = tuple(float(p) for p in buf.tolist())
            self._probs_key = key
        return self._probs

    # ---- forward -------------------------------------------------------------------------------------
    def check_pixel_values(self, pixel_values: Any) -> None:
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be 4-D (batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}), "
                f"got shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor (normalised image), got {pixel_values.dtype}")
        _, channels, height, width = pixel_values.shape
        if channels != cfg.num_channels:
            raise ValueError(f"pixel_values has {channels} channels, the model expects {cfg.num_channels}")
        if (height, width) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values is {height}x{width}, the model expects {cfg.image_size}x{cfg.image_size} "
                "(resize and pad with the image processor; "
                + ("the mask head reshapes the patches to the config's grid, in transformers too)" if cfg.rope
                   else "position embeddings are not interpolated)")
            )
        if pixel_values.device != self.device:
            raise ValueError(f"pixel_values is on {pixel_values.device} but the model is on {self.device}")

    def _pixel_embeddings(self, patch_tokens: torch.Tensor, ops: Ops) -> torch.Tensor:
        """(B, P, C) patch tokens -> (B, H, W, C) pixel embeddings after the upscale blocks."""
        g = self.config.grid_size
        x = patch_tokens.reshape(patch_tokens.shape[0], g, g, patch_tokens.shape[-1])
        for block in self.upscale:
            x = block(x, ops)
        return x

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """EoMT-DINOv3's (cos, sin) (P, head_dim) for the model's grid, in its dtype (computed in float32, or
        float64 for a float64 model, and cast, as transformers does), made once per device and dtype; None
        for a model without RoPE."""
        cfg = self.config
        if not cfg.rope:
            return None
        key = (self.device, self.dtype)
        tables = self._rope_cache.get(key)
        if tables is None:
            exact = torch.float64 if self.dtype == torch.float64 else torch.float32
            cos, sin = rope_tables_ref(cfg.grid_size, cfg.grid_size, cfg.head_dim, cfg.rope_theta, self.device, exact)
            tables = (cos.to(self.dtype), sin.to(self.dtype))
            if not torch.compiler.is_compiling():  # a compiled graph computes them itself
                self._rope_cache[key] = tables
        return tables

    def _split_tokens(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.config.num_queries
        return normed[:, :q], normed[:, q + self.config.num_prefix_tokens:]

    def _layernorm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias,
                                              self.config.layer_norm_eps)

    def _query_patch_mask(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        """The (B, Q, P) mask of a masked layer, from predict() on LayerNorm(x) at grid resolution."""
        queries, patches = self._split_tokens(self._layernorm(x))
        return ops["grid_attention_mask"](self.mask_head(queries, ops), self._pixel_embeddings(patches, ops),
                                          self.config.grid_size)

    def _token_buffer(self, batch: int) -> torch.Tensor:
        """The (B, Q + 1 + R + P, C) residual stream of one forward, uninitialised: every row is written before
        it is read (the query rows just before the first query layer)."""
        cfg = self.config
        seq = cfg.num_queries + cfg.num_prefix_tokens + cfg.num_patches
        return torch.empty(batch, seq, cfg.hidden_size, dtype=self.dtype, device=self.device)

    def _sequence_lengths(self) -> list[int]:
        """The token count each layer sees: 1 + R + P before the query layers, Q + 1 + R + P in them."""
        cfg = self.config
        body = cfg.num_prefix_tokens + cfg.num_patches
        return [body + cfg.num_queries * (index >= cfg.first_query_layer) for index in range(cfg.num_hidden_layers)]

    def _empty_output(self, patch_offsets, recording: Recording | None = None) -> EomtFastOutput:
        cfg, kw = self.config, {"dtype": self.dtype, "device": self.device}
        seq = cfg.num_queries + cfg.num_prefix_tokens + cfg.num_patches
        out = EomtFastOutput(
            class_queries_logits=torch.empty(0, cfg.num_queries, cfg.num_labels + 1, **kw),
            masks_queries_logits=torch.empty(0, cfg.num_queries, self.mask_size, self.mask_size, **kw),
            last_hidden_state=torch.empty(0, seq, cfg.hidden_size, **kw),
            patch_offsets=patch_offsets,
        )
        if recording is None:
            return out
        lengths = self._sequence_lengths()  # what a batch of images would give, with batch 0
        if recording.hidden_states is not None:  # layer 0's input, the outputs of layers 0..L-2, last_hidden_state
            recording.hidden_states.extend(torch.empty(0, n, cfg.hidden_size, **kw) for n in lengths[:1] + lengths)
            if recording.tie_last:
                recording.hidden_states[-1] = out.last_hidden_state
        if recording.attentions is not None:
            recording.attentions.extend(torch.empty(0, cfg.num_attention_heads, n, n, **kw) for n in lengths)
        return recording.fill(out)

    @torch.no_grad()
    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> EomtFastOutput | tuple:
        """pixel_values (B, channels, image_size, image_size), normalised. The positional order is
        transformers' (pixel_values, mask_labels, class_labels, patch_offsets); the rest is keyword-only.
        ``patch_offsets`` (from the image processor's semantic sliding windows) is passed through. ``generator`` drives the random unmasking of
        layers whose attn_mask_probs lies strictly between 0 and 1 (default: torch's global generator, as
        transformers; not with cuda_graphs, whose graphs draw from the default generator). The caller's
        pixel_values are never written.

        As in transformers (defaults from the checkpoint's config.json, else False / False / True):
        ``output_hidden_states=True`` adds the embeddings and every layer's output (the last one replaced by
        ``last_hidden_state``, after the final LayerNorm); ``output_attentions=True`` adds every layer's
        (B, heads, S, S) attention probabilities, as transformers' eager attention returns them (computed
        apart, in plain PyTorch: O(S^2) memory per layer); ``return_dict=False`` returns ``to_tuple()``.
        Either output runs the forward uncaptured, even with CUDA graphs enabled. ``mask_labels`` and
        ``class_labels`` (transformers' training loss) are refused: this is an inference model."""
        if mask_labels is not None or class_labels is not None:
            raise ValueError("mask_labels / class_labels are for transformers' training loss; "
                             "EomtFastForUniversalSegmentation is inference only (train with transformers' model)")
        recording = Recording.requested(
            self._flag("output_hidden_states", output_hidden_states, False),
            self._flag("output_attentions", output_attentions, False),
            self._flag("tie_last_hidden_states", None, True),  # transformers 5.24 reads it from config.json, 5.17 not
        )
        as_dict = self._flag("return_dict", return_dict, True)
        graphs = self._cuda_graphs
        # graphs.model is not self in a shallow copy (nn.DataParallel's replicas): it runs eager, on its device
        if recording is None and not torch.compiler.is_compiling() and graphs is not None and graphs.model is self:
            out = graphs(pixel_values, patch_offsets, generator)
        else:
            out = self._eager_output(pixel_values, patch_offsets, generator, recording)
        return out if as_dict else out.to_tuple()

    def _eager_output(self, pixel_values: torch.Tensor, patch_offsets: list[torch.Tensor] | None,
                      generator: torch.Generator | None, recording: Recording | None = None) -> EomtFastOutput:
        """The forward without CUDA graphs (forward's arguments, checked here)."""
        self.check_pixel_values(pixel_values)
        if pixel_values.shape[0] == 0:
            return self._empty_output(patch_offsets, recording)
        out = self._output(*self._forward_tensors(pixel_values, generator, recording), patch_offsets)
        return recording.fill(out) if recording is not None else out

    def _flag(self, name: str, value: Any, default: bool) -> bool:
        """A forward flag: the argument, else the value config.json carried (transformers' default), else
        ``default`` (also for a null in config.json); only True or False."""
        if value is None:
            value = self.config.extra.get(name)
        if value is None:  # not in config.json, or null there ("unset" in transformers)
            value = default
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}"
                            + (" (select layers from the returned tuple)" if name == "output_hidden_states" else ""))
        return value

    @staticmethod
    def _output(class_logits: torch.Tensor, mask_logits: torch.Tensor, last_hidden_state: torch.Tensor,
                patch_offsets: list[torch.Tensor] | None) -> EomtFastOutput:
        return EomtFastOutput(class_queries_logits=class_logits, masks_queries_logits=mask_logits,
                              last_hidden_state=last_hidden_state, patch_offsets=patch_offsets)

    def _forward_tensors(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None,
        recording: Recording | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network on checked pixel_values of batch >= 1: (class logits, mask logits, last hidden state).
        No host sync once the host caches (ops, masking_probs) are filled: CUDA graphs capture this.
        ``recording`` collects copies of the hidden states and the attention probabilities on the way."""
        cfg = self.config
        batch = pixel_values.shape[0]
        queries, prefix = cfg.num_queries, cfg.num_prefix_tokens
        patch_start = queries + prefix
        probs = self.masking_probs()
        ops = self.ops()
        rope = self._rope_tables()

        tokens = self._token_buffer(batch)  # [Q queries | CLS | R registers | P patches]
        body = tokens[:, queries:]  # what the layers before the queries see
        ops["patch_embed"](pixel_values.to(self.dtype), self.patch_weight, self.patch_bias, self.position_embeddings,
                           cfg.patch_size, out=tokens[:, patch_start:])
        body[:, 0].copy_(self.cls_token)  # broadcast over the batch
        body[:, 1:prefix].copy_(self.register_tokens)
        mask = None  # like transformers, a later layer with prob 0 keeps the last mask computed
        hidden_states = recording.hidden_states if recording is not None else None
        attentions = recording.attentions if recording is not None else None
        for index, layer in enumerate(self.layers):
            block = index - cfg.first_query_layer
            if block == 0:
                tokens[:, :queries].copy_(self.query)
            x = tokens if block >= 0 else body
            if hidden_states is not None and index == 0:
                hidden_states.append(x.clone())  # what the first layer reads (transformers: its input)
            if block >= 0 and probs[block] > 0:
                mask = self._query_patch_mask(x, ops)
                if probs[block] < 1:  # each query row unmasked with probability 1 - prob
                    keep_all = torch.rand(batch, queries, device=x.device, generator=generator) > probs[block]
                    mask = mask | keep_all[:, :, None]
            layer(x, mask if block >= 0 else None, patch_start, ops, attentions, rope)  # updates the buffer in place
            if hidden_states is not None and (index < cfg.num_hidden_layers - 1 or not recording.tie_last):
                hidden_states.append(x.clone())  # the last layer's output is replaced by last_hidden_state
        if cfg.num_blocks == 0:  # queries enter after the last layer (transformers cannot run this config)
            tokens[:, :queries].copy_(self.query)

        x = self._layernorm(tokens)
        if hidden_states is not None and recording.tie_last:
            hidden_states.append(x)  # transformers: hidden_states[-1] is last_hidden_state
        query_tokens, patches = self._split_tokens(x)
        class_logits = torch.nn.functional.linear(query_tokens, self.class_weight, self.class_bias)
        mask_logits = ops["mask_logits"](self.mask_head(query_tokens, ops), self._pixel_embeddings(patches, ops))
        return class_logits, mask_logits, x
