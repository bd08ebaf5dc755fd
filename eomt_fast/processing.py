"""EoMT pre- and post-processing in torch, on the model's device: transformers' ``EomtImageProcessor``
without its per-query Python loops and host syncs.

Preprocessing (what ``EomtImageProcessor.preprocess`` does, per image):

    resize    long side -> longest_edge (panoptic/instance: size {"shortest_edge": S, "longest_edge": S}),
              or short side -> shortest_edge (semantic: {"shortest_edge": S, "longest_edge": None});
              bilinear with antialias. uint8 images are resized like Pillow's BILINEAR on 8-bit data
              (what transformers' PIL backend calls; torchvision's CPU uint8 path is the same kernel):
              a horizontal pass rounded to 8 bits, then a vertical pass rounded (on the CPU torch's
              uint8 kernel, elsewhere the same passes in float32); 0.1-0.5% of the pixels differ from
              Pillow by one level. Float images: one pass, no rounding (torchvision's float path).
    split     semantic models (do_split_image): ceil(long / S) windows of S x S along the long side,
              evenly overlapping; ``patch_offsets`` holds [image index, start, end] per window.
    pad       bottom/right with zeros to (shortest_edge, longest_edge or shortest_edge) (do_pad).
    normalise (x * rescale_factor - mean) / std, computed as transformers' PIL backend computes it.

Post-processing (what ``post_process_{semantic,instance,panoptic}_segmentation`` return, same structures):

    mask logits (Q, m, m) --bilinear--> (shortest, longest or shortest) --crop to the resized image-->
    --bilinear--> the original (H, W)                        [panoptic and instance]
    semantic: sigmoid(masks at (shortest, longest)) x softmax(classes)[:, :-1] -> (C, h, w) per window,
    windows averaged back per image, resized to (H, W), argmax over classes.

The same torch ops as transformers run on the same values, so the label maps are identical to
transformers' except where two candidates tie (to the last bit, or to rounding where a reduction is
split differently). What changes is how much is computed and when the host waits:

- panoptic keeps only the queries whose class score passes ``threshold`` before upsampling any mask;
  instance keeps the queries whose class score could pass it (mask scores are <= 1);
- full-resolution masks are made in chunks of queries, each folded at once into running per-pixel
  results (argmax and winner probability, painter's order, areas), so about ``max_elements`` floats
  of masks exist at a time, never (Q, H, W); semantic scores are resized to (H, W) and arg-maxed in
  chunks of classes, and summed over queries in chunks when (Q, h, w) is larger than ``max_elements``;
- segment validity, stuff fusion and segment ids are tensor ops over the kept queries; the host reads
  one small tensor per batch (which queries to keep) and one per image (the segment table).
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
TASKS = ("panoptic", "instance", "semantic")
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# Full-resolution masks are processed this many elements at a time (32 Mi floats: 128 MB in fp32).
DEFAULT_MAX_ELEMENTS = 1 << 25


# ---- sizes ---------------------------------------------------------------------------------------------
def normalize_size(size: Any) -> dict[str, int | None]:
    """transformers' size dict {"shortest_edge": S, "longest_edge": L or None}; an int S means (S, S)."""
    if size is None:
        return {"shortest_edge": 640, "longest_edge": 640}
    if isinstance(size, int) and not isinstance(size, bool):
        return {"shortest_edge": size, "longest_edge": size}
    if isinstance(size, dict) and size.get("shortest_edge"):
        longest = size.get("longest_edge")
        return {"shortest_edge": int(size["shortest_edge"]), "longest_edge": int(longest) if longest else None}
    raise ValueError(f"size must be an int or a dict with 'shortest_edge' (and optionally 'longest_edge'), "
                     f"got {size!r}")


def size_with_aspect_ratio(image_size: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """(height, width) after resizing: the short side to ``size``, unless the long side would then exceed
    ``max_size``, in which case the long side becomes ``max_size``. The same integer arithmetic as
    transformers' ``get_size_with_aspect_ratio`` (and, without max_size, ``get_resize_output_image_size``)."""
    height, width = image_size
    raw_size = None
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            raw_size = max_size * short / long
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        scale = raw_size if raw_size is not None else size
        return int(scale * height / width), size
    scale = raw_size if raw_size is not None else size
    return size, int(scale * width / height)


def canvas_size(size: dict[str, int | None]) -> tuple[int, int]:
    """(height, width) of the padded input and of the first mask upsampling: (shortest, longest or shortest)."""
    return size["shortest_edge"], size["longest_edge"] or size["shortest_edge"]


def window_offsets(long_side: int, window: int) -> list[tuple[int, int]]:
    """[start, end) of the ceil(long / window) evenly overlapping windows of ``do_split_image``."""
    count = math.ceil(long_side / window)
    overlap = (count * window - long_side) / (count - 1) if count > 1 else 0
    return [(int(i * (window - overlap)), int(i * (window - overlap)) + window) for i in range(count)]


# ---- inputs --------------------------------------------------------------------------------------------
def _image_to_tensor(image: Any, device: torch.device) -> torch.Tensor:
    """One image -> (3, H, W) tensor on ``device``: uint8 stays uint8, anything else becomes float32.

    Accepts a PIL image (converted to RGB), an HWC / HW numpy array, or a CHW / HW torch tensor.
    Grayscale is repeated to 3 channels; a 4th (alpha) channel is dropped, as PIL's convert("RGB") does.
    """
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image without importing PIL
        image = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # a CHW array
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"an image array must be HWC or HW, got shape {image.shape}")
        with warnings.catch_warnings():  # arrays of PIL images are read-only; nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(np.ascontiguousarray(image))
        tensor = tensor.to(device, non_blocking=True).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.to(device)
        if tensor.dim() == 2:
            tensor = tensor[None]
        if tensor.dim() != 3:
            raise ValueError(f"an image tensor must be CHW or HW, got shape {tuple(tensor.shape)}")
    else:
        raise TypeError(f"an image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    channels = tensor.shape[0]
    if channels == 1:
        tensor = tensor.expand(3, -1, -1)
    elif channels == 4:
        tensor = tensor[:3]
    elif channels != 3:
        raise ValueError(f"an image must have 1, 3 or 4 channels, got {channels} (shape {tuple(tensor.shape)})")
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"empty image of shape {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        tensor = tensor.float()
    return tensor


def _as_image_list(images: Any) -> list[Any]:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images.unbind(0))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, h, w) uint8 or float image -> (3, height, width), bilinear with antialias, like Pillow's BILINEAR.

    uint8 on the CPU: torch's uint8 antialiased kernel, a port of Pillow's (fixed-point coefficients, a
    horizontal then a vertical pass, 8-bit intermediate): returns uint8. uint8 elsewhere (CUDA has no
    uint8 kernel): ``resize_uint8_in_float``. Either way a small fraction of the pixels (typically
    0.1-0.5%) differ from Pillow by one level. float input: one pass, no rounding (torchvision's float path)."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                             align_corners=False)[0]
    if image.dtype == torch.uint8:
        return resize_uint8_in_float(image, height, width)
    x = image[None].to(torch.float32, memory_format=torch.contiguous_format)
    return interpolate_antialias(x, (height, width))[0]


def resize_uint8_in_float(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's two 8-bit passes in float32: horizontal, rounded half up to an integer in [0, 255], then
    vertical, rounded. Returns integer-valued float32 (3, height, width)."""
    x = image[None].to(torch.float32, memory_format=torch.contiguous_format)
    h, w = x.shape[-2:]
    if w != width:
        x = interpolate_antialias(x, (h, width)).add_(0.5).floor_().clamp_(0, 255)
    if h != height:
        x = interpolate_antialias(x, (height, width)).add_(0.5).floor_().clamp_(0, 255)
    return x[0]


def interpolate_antialias(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", antialias=True)`` of float (N, C, H, W). GPU backends refuse
    large downscales (their kernel keeps the filter weights in shared memory: CUDA's "Too much shared memory
    required" at very large factors, read from its source rather than measured here; ROCm's, compiled from
    the same source, already at page-sized images, as reported elsewhere); those get
    ``interpolate_antialias_taps``, the same filter as a gather and a weighted sum, instead of an error."""
    try:
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    except RuntimeError as exc:
        if "Too much shared memory" not in str(exc):
            raise
        return interpolate_antialias_taps(x, size)


def antialias_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight), both (out_size, taps): the input pixels and float64 weights of torch's (and
    Pillow's) antialiased bilinear resize for each output pixel: the triangle filter widened by the
    downscale factor (support = the scale when shrinking, 1 when enlarging), cut to [xmin, xmax) as torch
    cuts it and normalised to sum 1; taps past xmax have weight 0 (and a clamped index)."""
    scale = in_size / out_size
    support, inverse = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    center = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)
    first = (center - support + 0.5).trunc().clamp(min=0)  # torch: int64_t(center - support + 0.5), then max 0
    stop = (center + support + 0.5).trunc().clamp(max=in_size)
    taps = int((stop - first).max().item())
    index = first[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    weight = (1.0 - ((index - center[:, None] + 0.5) * inverse).abs()).clamp(min=0.0) * (index < stop[:, None])
    total = weight.sum(dim=1, keepdim=True)
    weight = torch.where(total > 0, weight / total.clamp(min=1e-300), weight)
    return index.clamp(max=in_size - 1).long(), weight


_TAPS_CHUNK_BYTES = 64 << 20  # the gathered (rows, out, taps) block of one step


def _resize_last_axis(x: torch.Tensor, size: int) -> torch.Tensor:
    index, weight = antialias_taps(x.shape[-1], size)
    index, weight = index.to(x.device), weight.to(x.device, x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], size, dtype=x.dtype, device=x.device)
    step = max(1, _TAPS_CHUNK_BYTES // (size * index.shape[1] * x.element_size()))
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = (rows[start:start + step][:, index] * weight).sum(dim=-1)
    return out.reshape(*x.shape[:-1], size)


def interpolate_antialias_taps(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The antialiased bilinear resize of float (N, C, H, W), width then height, each output pixel the
    weighted sum of its few input pixels (``antialias_taps``): any scale, any device, in x's dtype with
    elementwise products (no matrix product, so no TF32), memory bounded by ``_TAPS_CHUNK_BYTES`` a step."""
    height, width = size
    h, w = x.shape[-2:]
    if w != width:
        x = _resize_last_axis(x, width)
    if h != height:
        x = _resize_last_axis(x.transpose(-1, -2), height).transpose(-1, -2)
    return x


class PreprocessedImages(NamedTuple):
    """What ``preprocess`` returns: model inputs and what post-processing needs to undo them.

    A tuple (``pixel_values, patch_offsets, target_sizes = ...``) that also reads like transformers'
    BatchFeature: ``inputs["pixel_values"]``, ``model(**inputs)`` (its keys are the model's inputs,
    pixel_values and patch_offsets, also for ``items`` and ``values``), ``in``, ``get`` and ``[...]`` (which
    know target_sizes too) and ``inputs = inputs.to(...)``.
    Being a tuple, iterating it and ``len`` give its three fields, and ``to`` returns a new object (a
    BatchFeature changes itself): assign the result."""

    pixel_values: torch.Tensor  # (N, 3, h, w), N = number of images, or of windows with do_split_image
    patch_offsets: list[torch.Tensor] | None  # one [image index, start, end] per window, or None
    target_sizes: list[tuple[int, int]]  # (height, width) of each original image

    def keys(self) -> tuple[str, ...]:
        """The model's inputs, for ``model(**inputs)``; target_sizes is for post-processing."""
        return ("pixel_values", "patch_offsets")

    def __contains__(self, key: object) -> bool:  # type: ignore[override]
        """A field name (target_sizes too, as ``[...]`` reads it), else a value as in any tuple."""
        return key in self._fields if isinstance(key, str) else tuple.__contains__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._fields else default

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(f"{key!r}: the fields are {', '.join(self._fields)}")
            return getattr(self, key)
        return tuple.__getitem__(self, key)

    def to(self, *args: Any, **kwargs: Any) -> PreprocessedImages:
        """As BatchFeature.to: pixel_values to a device and/or floating dtype (``.to("cuda")``,
        ``.to(torch.bfloat16)``, ``.to(device=..., dtype=..., non_blocking=...)``); patch_offsets follow the
        device. A new object: this one is left as it was."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        non_blocking = bool(kwargs.pop("non_blocking", False))
        if kwargs:
            raise TypeError(f"to() got unexpected keyword arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = torch.device(arg)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"pixel_values can only be cast to a floating dtype, got {dtype}")
        pixel_values = self.pixel_values.to(device=device, dtype=dtype, non_blocking=non_blocking)
        offsets = self.patch_offsets
        if offsets is not None and device is not None:
            offsets = [o.to(device, non_blocking=non_blocking) for o in offsets]
        return PreprocessedImages(pixel_values, offsets, self.target_sizes)


@dataclass
class SemanticSegmentationResult:
    """transformers' SemanticSegmentationPostProcessorOutput: the label map and, on request, the scores."""

    segmentation: torch.Tensor
    segmentation_scores: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor | None:
        return getattr(self, key)


def _field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, dict):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _sizes(target_sizes: Any, count: int | None, what: str) -> list[tuple[int, int]]:
    if target_sizes is None:
        raise ValueError("target_sizes is required: the (height, width) of each original image")
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.tolist()
    sizes = [(int(h), int(w)) for h, w in target_sizes]
    if count is not None and len(sizes) != count:
        raise ValueError(f"got {len(sizes)} target_sizes for {count} {what}")
    return sizes


def _per_channel(value: float | Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value) if isinstance(value, Iterable) else (float(value),) * 3
    if len(values) != 3:
        raise ValueError(f"image_mean / image_std need 3 values (RGB), got {value!r}")
    return values


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small read-only tensor of ``values`` on ``device``, made once: ``torch.tensor(list, device=cuda)``
    is a blocking host-to-device copy (a sync per call). Callers never write it."""
    with torch.inference_mode(False):  # usable outside inference mode too
        return torch.tensor(values, dtype=dtype, device=device)


def _chunk(total_per_item: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, total_per_item))


# ---- the processor -------------------------------------------------------------------------------------
class EomtFastImageProcessor:
    """EoMT image processor on torch devices: the arguments, outputs and semantics of transformers'
    ``EomtImageProcessor`` (defaults included), with batched, vectorised post-processing.

    ``EomtFastImageProcessor.from_config(config, task)`` gives what the released checkpoints use:
    panoptic/instance resize the long side to image_size and pad to a square; semantic resizes the short
    side to image_size and cuts sliding windows. ``from_pretrained(directory)`` reads the directory's
    preprocessor_config.json when there is one.
    """

    def __init__(
        self,
        size: int | dict[str, int | None] | None = None,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        do_split_image: bool = False,
        do_pad: bool = False,
        device: torch.device | str | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        self.size = normalize_size(size)
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = do_normalize
        self.image_mean = _per_channel(image_mean)
        self.image_std = _per_channel(image_std)
        self.do_split_image = do_split_image
        self.do_pad = do_pad
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {max_elements}")
        self.max_elements = int(max_elements)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, do_split_image={self.do_split_image}, "
                f"do_pad={self.do_pad}, device={self.device})")

    # ---- construction ----
    @classmethod
    def from_config(cls, config: Any, task: str = "panoptic", **kwargs: Any) -> EomtFastImageProcessor:
        """The preprocessing the released checkpoints of ``task`` use, for a model config (EomtFastConfig,
        transformers' EomtConfig, or a config.json dict). Keyword arguments override."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        image_size = config["image_size"] if isinstance(config, dict) else config.image_size
        if isinstance(image_size, (list, tuple)):
            image_size = image_size[0]
        if task == "semantic":
            defaults = dict(size={"shortest_edge": image_size, "longest_edge": None}, do_split_image=True, do_pad=False)
        else:
            defaults = dict(size={"shortest_edge": image_size, "longest_edge": image_size}, do_split_image=False,
                            do_pad=True)
        return cls(**{**defaults, **kwargs})

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> EomtFastImageProcessor:
        """From a preprocessor_config.json dictionary (unknown keys are ignored)."""
        keys = ("size", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                "do_split_image", "do_pad")
        return cls(**{**{k: data[k] for k in keys if data.get(k) is not None}, **kwargs})

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, task: str | None = None,
                        **kwargs: Any) -> EomtFastImageProcessor:
        """A model directory (or Hub id): its preprocessor_config.json when present, else ``from_config``
        of its config.json for ``task`` (default panoptic). From the Hub only those two files are fetched
        (``revision``, ``token``, ``cache_dir``, ``local_files_only`` among the keyword arguments go to
        huggingface_hub; the others override settings)."""
        from .checkpoint import HUB_OPTIONS, resolve_directory

        hub_options = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
        directory = resolve_directory(path_or_hub_id, weights=False, **hub_options)
        path = directory / PREPROCESSOR_CONFIG_NAME
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f), **kwargs)
        with open(directory / "config.json", encoding="utf-8") as f:
            return cls.from_config(json.load(f), task or "panoptic", **kwargs)

    # ---- preprocessing ----
    def __call__(self, images: Any, **kwargs: Any) -> PreprocessedImages:
        return self.preprocess(images, **kwargs)

    @torch.no_grad()
    def preprocess(self, images: Any, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32, return_tensors: str | None = None) -> PreprocessedImages:
        """images: one image or a list of images of any sizes (PIL images, HWC uint8 numpy arrays, CHW
        uint8 or float tensors; float values on the 0-255 scale, as transformers rescales them too), or a
        (B, 3, H, W) tensor. Returns ``(pixel_values, patch_offsets, target_sizes)`` on ``device``
        (default: the processor's device). ``return_tensors`` is taken as transformers' processors take it,
        "pt" or None only: the results are always torch tensors."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' (or None): EomtFastImageProcessor returns torch "
                             f"tensors, got {return_tensors!r}")
        device = torch.device(device) if device is not None else self.device
        tensors = [_image_to_tensor(image, device) for image in _as_image_list(images)]
        target_sizes = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
        shortest, longest = self.size["shortest_edge"], self.size["longest_edge"]
        resized = []
        for tensor in tensors:
            if self.do_resize:
                height, width = size_with_aspect_ratio(tuple(tensor.shape[1:]), shortest, longest)
                tensor = resize_image(tensor, height, width)
            resized.append(tensor)

        patch_offsets = None
        if self.do_split_image:
            pieces, patch_offsets = [], []
            for index, image in enumerate(resized):
                height, width = image.shape[1:]
                vertical = height > width
                for start, end in window_offsets(max(height, width), shortest):
                    pieces.append(image[:, start:end] if vertical else image[:, :, start:end])
                    patch_offsets.append(torch.tensor([index, start, end]))
            resized = pieces

        # The canvas stays uint8 while every image is (the CPU path); the padding is zeros, as in transformers.
        canvas_dtype = torch.uint8 if all(r.dtype == torch.uint8 for r in resized) else torch.float32
        if self.do_pad:
            pad_h, pad_w = canvas_size(self.size)
            out_h = max([pad_h] + [r.shape[1] for r in resized])
            out_w = max([pad_w] + [r.shape[2] for r in resized])
            pixel_values = torch.zeros(len(resized), 3, out_h, out_w, dtype=canvas_dtype, device=device)
            for i, image in enumerate(resized):
                pixel_values[i, :, : image.shape[1], : image.shape[2]] = image
        elif len({tuple(r.shape) for r in resized}) > 1:
            raise ValueError(
                f"the images have different sizes after resizing ({sorted({tuple(r.shape[1:]) for r in resized})}); "
                "use do_pad=True (panoptic/instance) or do_split_image=True (semantic) to batch them"
            )
        elif resized:
            pixel_values = torch.stack([r.to(canvas_dtype) for r in resized])
        else:
            pixel_values = torch.empty(0, 3, *canvas_size(self.size), device=device)

        x = pixel_values.float()  # a new tensor, or the canvas itself: safe to modify in place
        if self.do_rescale:
            # transformers' PIL backend computes x * factor in float64 and stores float32; for factor 1/255
            # and integer x that is exactly float32 x / 255 (checked for all 256 values), no float64 needed.
            x = x.div_(255) if self.rescale_factor == 1 / 255 else x.double().mul_(self.rescale_factor).float()
        if self.do_normalize:  # then (x - mean) / std in float32, as transformers
            # x.device, with its index: a bare "cuda" would cache the constant on whichever device was current
            x = x.sub_(device_constant(tuple(self.image_mean), torch.float32, x.device)[:, None, None])
            x = x.div_(device_constant(tuple(self.image_std), torch.float32, x.device)[:, None, None])
        pixel_values = x
        return PreprocessedImages(pixel_values.to(dtype), patch_offsets, target_sizes)

    # ---- post-processing: shared pieces ----
    def _upsample_masks(self, masks: torch.Tensor, size: dict, target: tuple[int, int]) -> torch.Tensor:
        """(k, m, m) mask logits -> (k, H, W): the two bilinear resizes of transformers (to the canvas, then
        of the crop that holds the resized image to the original size), on these k queries only."""
        canvas = canvas_size(size)
        height, width = size_with_aspect_ratio(target, size["shortest_edge"], size["longest_edge"])
        x = F.interpolate(masks[None], size=canvas, mode="bilinear", align_corners=False)[0]
        x = x[:, :height, :width]
        return F.interpolate(x[None], size=target, mode="bilinear", align_corners=False)[0]

    @staticmethod
    def _count(index: torch.Tensor, counted: torch.Tensor | None, bins: int) -> torch.Tensor:
        """Per-bin counts of ``index`` (only where ``counted``). torch.bincount on the CPU; on other devices
        a scatter-add, as bincount there reads the largest index back to the host."""
        index = index.flatten()
        if index.device.type == "cpu":
            if counted is not None:
                index = index[counted.flatten()]
            return torch.bincount(index, minlength=bins)
        return scatter_count(index, counted, bins)

    # ---- panoptic ----
    @torch.no_grad()
    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        target_sizes: Any,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        stuff_classes: Iterable[int] | None = None,
        size: dict[str, int | None] | None = None,
        label_ids_to_fuse: Iterable[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Like transformers: per image {"segmentation": (H, W) int64 segment ids, -1 where no segment,
        "segments_info": [{"id", "label_id", "score"}]}. Queries whose class score (softmax max over all
        classes) exceeds ``threshold`` and whose best class is not "no object" compete per pixel by
        score x mask probability; a query's segment is the pixels it wins with probability >=
        ``mask_threshold``, kept when it is more than ``overlap_mask_area_threshold`` of the query's own
        mask. Queries of a class in ``stuff_classes`` (or ``label_ids_to_fuse``) share one segment."""
        size = normalize_size(size if size is not None else self.size)
        masks, logits = _field(outputs, "masks_queries_logits"), _field(outputs, "class_queries_logits")
        sizes = _sizes(target_sizes, logits.shape[0], "images")
        num_labels = logits.shape[-1] - 1
        scores, labels = logits.softmax(-1).max(-1)
        keep = labels.ne(num_labels) & (scores > threshold)  # tensor > float: compared in the logits' dtype
        kept = keep.cpu()  # the one sync of the batch
        fuse = sorted({int(c) for c in (stuff_classes or ())} | {int(c) for c in (label_ids_to_fuse or ())})
        fuse_tensor = device_constant(tuple(fuse), labels.dtype, labels.device)
        results = []
        for i, target in enumerate(sizes):
            index = kept[i].nonzero()[:, 0].to(masks.device, non_blocking=True)
            if index.numel() == 0:
                results.append({"segmentation": torch.full(target, -1, dtype=torch.long, device=masks.device),
                                "segments_info": []})
                continue
            results.append(self._panoptic_one(masks[i, index], scores[i, index], labels[i, index], target, size,
                                              mask_threshold, overlap_mask_area_threshold, fuse_tensor))
        return results

    def _panoptic_one(self, masks, scores, labels, target, size, mask_threshold, overlap, fuse) -> dict[str, Any]:
        count = masks.shape[0]
        device = masks.device
        canvas = canvas_size(size)
        chunk = _chunk(canvas[0] * canvas[1] + target[0] * target[1], self.max_elements)
        best_weight = best_index = best_prob = None
        original_area = torch.empty(count, dtype=torch.long, device=device)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            probs = self._upsample_masks(masks[start:stop], size, target).sigmoid_()
            original_area[start:stop] = torch.count_nonzero(probs >= mask_threshold, dim=(1, 2))
            # max over queries returns the first maximum, as transformers' argmax over all kept queries
            chunk_weight, index = torch.max(scores[start:stop, None, None] * probs, dim=0)
            chunk_prob = probs.gather(0, index[None])[0]
            if best_weight is None:
                best_weight, best_index, best_prob = chunk_weight, index, chunk_prob
            else:  # a later chunk wins only when strictly larger: ties keep the first query
                better = chunk_weight > best_weight
                best_weight = torch.where(better, chunk_weight, best_weight)
                best_index = torch.where(better, index + start, best_index)
                best_prob = torch.where(better, chunk_prob, best_prob)
            del probs

        in_segment = best_prob >= mask_threshold  # the winner's own mask covers the pixel
        won_area = self._count(best_index, None, count)
        final_area = self._count(best_index, in_segment, count)
        ratio = won_area / original_area  # int64 / int64 -> float32, as transformers' 0-d division
        valid = (won_area > 0) & (original_area > 0) & (final_area > 0) & (ratio.double() > overlap)

        # A stuff class's queries form one segment with the id of its first valid query; every other
        # valid query starts a segment. Ids count segment starts in query order.
        order = torch.arange(count, device=device)
        # (labels == each fused class).any(): torch.isin sorts (two syncs on CUDA) from about 20 classes on
        is_fused = (labels[:, None] == fuse[None, :]).any(1)
        key = torch.where(is_fused, labels, labels.new_full((), -1) - order)
        same = (key[:, None] == key[None, :]) & valid[None, :]
        first = torch.where(same, order[None, :], count).amin(1)
        starts = valid & (first == order)
        segment_id = torch.cumsum(starts.long(), 0) - 1
        query_segment = torch.where(valid, segment_id[first.clamp(max=count - 1)], -1)
        segmentation = torch.where(in_segment, query_segment[best_index], -1)

        table = torch.stack([starts.double(), segment_id.double(), labels.double(), scores.double()]).tolist()
        segments = [
            {"id": int(sid), "label_id": int(label), "score": round(score, 6)}
            for is_start, sid, label, score in zip(*table) if is_start
        ]
        return {"segmentation": segmentation, "segments_info": segments}

    # ---- instance ----
    @torch.no_grad()
    def post_process_instance_segmentation(
        self,
        outputs: Any,
        target_sizes: Any,
        threshold: float = 0.8,
        size: dict[str, int | None] | None = None,
        **ignored: Any,
    ) -> list[dict[str, Any]]:
        """Like transformers: per image {"segmentation": (H, W) int64 segment ids, -1 where none,
        "segments_info": [{"id", "label_id", "score"}]}. A query is kept when its mask (logit > 0 at the
        original size) is not empty and class score (best real class) x mean mask probability inside the
        mask >= ``threshold``; later queries paint over earlier ones."""
        if ignored:  # transformers drops them too (filter_out_non_signature_kwargs), with a warning
            warnings.warn(f"post_process_instance_segmentation ignores {sorted(ignored)}", stacklevel=2)
        size = normalize_size(size if size is not None else self.size)
        masks, logits = _field(outputs, "masks_queries_logits"), _field(outputs, "class_queries_logits")
        sizes = _sizes(target_sizes, logits.shape[0], "images")
        scores, classes = logits.softmax(-1)[..., :-1].max(-1)
        # The final score is class score x mean probability (<= 1, up to float rounding), so only queries
        # with a class score near or above the threshold can pass: the others are never upsampled.
        candidates = (scores.double() * (1 + 1e-4) >= threshold).cpu()
        results = []
        for i, target in enumerate(sizes):
            index = candidates[i].nonzero()[:, 0].to(masks.device, non_blocking=True)
            results.append(self._instance_one(masks[i, index], scores[i, index], classes[i, index], target, size,
                                              threshold))
        return results

    def _instance_one(self, masks, scores, classes, target, size, threshold) -> dict[str, Any]:
        count, device = masks.shape[0], masks.device
        segmentation = torch.full(target, -1, dtype=torch.long, device=device)
        if count == 0:
            return {"segmentation": segmentation, "segments_info": []}
        canvas = canvas_size(size)
        chunk = max(2, _chunk(canvas[0] * canvas[1] + target[0] * target[1], self.max_elements))
        keep = torch.empty(count, dtype=torch.bool, device=device)
        final_scores = torch.empty(count, dtype=torch.float64, device=device)
        kept_before = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            mask_logits = self._upsample_masks(masks[start:stop], size, target)
            binary = mask_logits > 0
            chunk_scores = (scores[start:stop] * _mean_probability_inside(mask_logits)).double()  # as Python does
            chunk_keep = binary.flatten(1).any(1) & (chunk_scores >= threshold)
            keep[start:stop], final_scores[start:stop] = chunk_keep, chunk_scores
            # painter's order: the last kept query of the chunk covering a pixel, then over earlier chunks
            rank = torch.arange(1, stop - start + 1, dtype=torch.int32, device=device)
            last = ((binary & chunk_keep[:, None, None]) * rank[:, None, None]).amax(0)
            ids = kept_before + torch.cumsum(chunk_keep.long(), 0) - 1
            painted = torch.cat([ids.new_full((1,), -1), ids])[last.long()]  # rank 0: no kept query here
            segmentation = torch.where(last > 0, painted, segmentation)
            kept_before = kept_before + chunk_keep.sum()
        table = torch.stack([keep.double(), classes.double(), final_scores]).tolist()
        segments, next_id = [], 0
        for is_kept, label, score in zip(*table):
            if is_kept:
                segments.append({"id": next_id, "label_id": int(label), "score": round(score, 6)})
                next_id += 1
        return {"segmentation": segmentation, "segments_info": segments}

    # ---- semantic ----
    @torch.no_grad()
    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Any,
        size: dict[str, int | None] | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationResult]:
        """Like transformers: per image an (H, W) int64 map of class ids (argmax of the class scores), or
        with ``return_segmentation_scores`` a result with ``segmentation`` and ``segmentation_scores``
        (C, H, W). Sliding windows (``outputs.patch_offsets``) are averaged back per image first."""
        size = normalize_size(size if size is not None else self.size)
        masks, logits = _field(outputs, "masks_queries_logits"), _field(outputs, "class_queries_logits")
        patch_offsets = _field(outputs, "patch_offsets")
        class_probs = logits.softmax(-1)[..., :-1]
        windows = masks.shape[0]
        if patch_offsets is not None and len(patch_offsets) > 0:
            offsets = torch.stack([torch.as_tensor(o) for o in patch_offsets]).tolist()
            if len(offsets) != windows:
                raise ValueError(f"{len(offsets)} patch_offsets for {windows} windows")
            sizes = _sizes(target_sizes, None, "images")
            results = []
            for image, target in enumerate(sizes):
                height, width = size_with_aspect_ratio(target, size["shortest_edge"], size["longest_edge"])
                total = torch.zeros(class_probs.shape[-1], height, width, device=masks.device)
                count = torch.zeros(1, height, width, device=masks.device)
                vertical = target[0] > target[1]
                for n, (owner, start, end) in enumerate(offsets):
                    if owner != image:
                        continue
                    window = self._class_scores(masks[n], class_probs[n], size)
                    if vertical:
                        total[:, start:end] += window
                        count[:, start:end] += 1
                    else:
                        total[:, :, start:end] += window
                        count[:, :, start:end] += 1
                results.append(self._label_map(total / count.clamp(min=1), target, return_segmentation_scores))
            return results
        sizes = _sizes(target_sizes, windows, "images")
        return [self._label_map(self._class_scores(masks[n], class_probs[n], size), target, return_segmentation_scores)
                for n, target in enumerate(sizes)]

    def _class_scores(self, masks: torch.Tensor, class_probs: torch.Tensor, size: dict) -> torch.Tensor:
        """(Q, m, m) mask logits, (Q, C) class probabilities -> (C, h, w) at the canvas size: sum over queries
        of class probability x sigmoid(mask), transformers' einsum; chunked over queries when large."""
        canvas = canvas_size(size)
        queries = masks.shape[0]
        chunk = _chunk(canvas[0] * canvas[1], self.max_elements)
        if chunk >= queries:
            probs = F.interpolate(masks[None], size=canvas, mode="bilinear", align_corners=False).sigmoid_()
            return torch.einsum("bqc,bqhw->bchw", class_probs[None], probs)[0]
        total = torch.zeros(class_probs.shape[-1], *canvas, device=masks.device,
                            dtype=torch.promote_types(masks.dtype, torch.float32))
        for start in range(0, queries, chunk):
            probs = F.interpolate(masks[None, start:start + chunk], size=canvas, mode="bilinear",
                                  align_corners=False).sigmoid_()[0]
            weights = class_probs[start:start + chunk].to(total.dtype)
            total += torch.einsum("qc,qhw->chw", weights, probs.to(total.dtype))
        return total.to(masks.dtype)

    def _label_map(self, scores: torch.Tensor, target: tuple[int, int], keep_scores: bool):
        """(C, h, w) class scores -> (H, W) argmax after a bilinear resize to ``target``; in chunks of classes
        (a later chunk wins only when strictly larger, so ties keep the lowest class, as argmax)."""
        if keep_scores:
            full = F.interpolate(scores[None], size=target, mode="bilinear", align_corners=False)[0]
            return SemanticSegmentationResult(full.argmax(0), full)
        classes = scores.shape[0]
        chunk = _chunk(target[0] * target[1], self.max_elements)
        best = best_index = None
        for start in range(0, classes, chunk):
            resized = F.interpolate(scores[None, start:start + chunk], size=target, mode="bilinear",
                                    align_corners=False)[0]
            value, index = torch.max(resized, dim=0)  # the first maximum, as argmax
            if best is None:
                best, best_index = value, index
            else:
                better = value > best
                best = torch.where(better, value, best)
                best_index = torch.where(better, index + start, best_index)
        return best_index


def scatter_count(index: torch.Tensor, counted: torch.Tensor | None, bins: int) -> torch.Tensor:
    """torch.bincount(index[counted], minlength=bins) without reading anything back to the host."""
    index = index.flatten()
    values = counted.flatten().long() if counted is not None else torch.ones_like(index)
    return torch.zeros(bins, dtype=torch.long, device=index.device).scatter_add_(0, index, values)


def _mean_probability_inside(mask_logits: torch.Tensor) -> torch.Tensor:
    """(k, H, W) mask logits -> (k,) mean sigmoid over the pixels with logit > 0 (0 for an empty mask), the
    expression of transformers. Reduced over at least two rows: on the CPU a single-row sum is split
    across threads and rounds differently from the per-row sums transformers computes over all queries."""
    rows = mask_logits if mask_logits.shape[0] > 1 else mask_logits.expand(2, -1, -1)
    inside = (rows > 0).flatten(1).float()
    return ((rows.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6))[: mask_logits.shape[0]]
