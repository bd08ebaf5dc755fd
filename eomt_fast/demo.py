"""A self-contained demo: build a small random-weight EoMT, save and reload it, segment a generated image."""

from __future__ import annotations

import math
import tempfile
import time

import torch

from .config import EomtFastConfig
from .model import EomtFastForUniversalSegmentation

# A small EoMT (ViT-S-like width, fewer layers), big enough to time, small enough for any CPU.
DEMO_CONFIG = dict(model_type="eomt", hidden_size=384, num_hidden_layers=6, num_attention_heads=6, image_size=256,
                   patch_size=16, num_queries=50, num_blocks=2, num_register_tokens=4,
                   id2label={i: name for i, name in enumerate(["background", "circle", "square", "stripe"])})

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def generated_image(size: int, seed: int = 0) -> torch.Tensor:
    """A (3, size, size) float image in [0, 1]: a gradient background, a disc, a square and stripes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([0.3 + 0.4 * xx, 0.2 + 0.5 * yy, 0.5 - 0.3 * xx * yy])
    cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([0.4, 0.4, 0.15]) + torch.tensor([0.3, 0.3, 0.1])).tolist()
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    image[:, disc] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    square = (xx > 0.05) & (xx < 0.3) & (yy > 0.6) & (yy < 0.85)
    image[:, square] = torch.tensor([0.1, 0.2, 0.9])[:, None]
    stripes = (torch.sin(xx * 40 * math.pi) > 0.6) & (yy < 0.2)
    image[:, stripes] = torch.tensor([0.95, 0.95, 0.2])[:, None]
    return image


def normalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image - mean) / std


def run_demo(device: str = "cpu", dtype: str | None = None, batch_size: int = 1, repeats: int = 5) -> dict:
    """Build, save, reload, run; print shapes and timings. Returns what it printed, for tests."""
    config = EomtFastConfig.from_dict(DEMO_CONFIG, source="demo config")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        EomtFastForUniversalSegmentation(config).save_pretrained(tmp)
        model = EomtFastForUniversalSegmentation.from_pretrained(tmp, device=device, dtype=dtype)
    model.attn_mask_probs.zero_()  # a trained checkpoint: masking annealed away
    pixel_values = normalize(generated_image(config.image_size))[None].repeat(batch_size, 1, 1, 1).to(device)
    print(f"model: EoMT {config.hidden_size}d x {config.num_hidden_layers} layers, {config.num_queries} queries, "
          f"{config.image_size}px, random weights, {model.dtype}, {model.device}, backend={model.backend}")
    for _ in range(2):  # warm-up: Triton compiles and autotunes, then (CUDA, cuda_graphs="auto") a graph is captured
        out = model(pixel_values)
    graphs = model.cuda_graphs is not None and len(model.cuda_graphs) > 0
    times = []
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        out = model(pixel_values)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        times.append(time.perf_counter() - start)
    median_ms = sorted(times)[len(times) // 2] * 1e3
    shapes = {name: tuple(getattr(out, name).shape)
              for name in ("masks_queries_logits", "class_queries_logits", "last_hidden_state")}
    for name, shape in shapes.items():
        print(f"  {name:<22} {shape}")
    print(f"  forward: median {median_ms:.1f} ms over {repeats} runs (batch {batch_size}, wall clock, "
          f"{'CUDA graph replays' if graphs else 'eager'})")
    print("  (random weights: the shapes and the timing are the point, the masks mean nothing yet)")
    return {"shapes": shapes, "median_ms": median_ms}
