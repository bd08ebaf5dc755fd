"""The whole mask side of EoMT at real shapes, as composite ops of several eomt_fast ops:

- ``predict``: the final predict() on the LayerNorm'ed tokens: class head, mask head, the upscale blocks
  (ViT-L/640: 1024 channels, 40x40 -> 80x80 -> 160x160) and the mask-logit einsum at full resolution
  (200 queries x 160 x 160); returns (mask logits, class logits). 79 GFLOP for EoMT-L/640.
- ``masked_layer_mask``: the attention mask of a masked layer, from the tokens entering it (LayerNorm'ed):
  mask head + upscale blocks + the query->patch mask at grid resolution (B, Q, g*g).

Implementations:
- ``eomt_fast``: the op sequence of ``EomtFastForUniversalSegmentation`` with the ops ``dispatch.resolve``
  picks (backend auto): Triton kernels on CUDA, the plain-PyTorch references on a CPU;
- ``eager``: the same sequence of the reference ops (``eomt_fast.kernels.*_ref``) in eager mode, and
  ``compile``: that sequence under torch.compile (max-autotune, no CUDA graphs, on a GPU);
- ``transformers``: transformers' own way, transcribed from ``EomtForUniversalSegmentation`` (modeling_eomt.py)
  on the same weights in its layout: predict() on NCHW tensors (ConvTranspose2d, GELU, depthwise Conv2d,
  LayerNorm2d's permutes, einsum "bqc, bchw -> bqhw"), and for the masked layer that predict() (class head
  included), F.interpolate of the full-resolution logits to g x g, > 0, written into a (B, S, S) boolean
  mask, expanded to the heads and turned into the dense (B, heads, S, S) float mask (+1 / -1e9) it builds.

Every output is checked against the eager reference (fp32 for bf16/fp16) before timing; the masks as the
fraction of entries that differ (a logit within rounding of 0 may come out either way).

    python bench/bench_predict.py            # GPU: every shape below
    python bench/bench_predict.py --quick    # CPU: a small shape (seconds)
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

import harness

FULL = [("eomt-l-640", 1), ("eomt-l-640", 8), ("eomt-s-640", 1), ("eomt-b-640", 1), ("eomt-g-640", 1)]
QUICK = [("quick", 1)]
QUICK_CONFIG = dict(hidden_size=256, num_queries=50, num_attention_heads=4, image_size=320, patch_size=16,
                    num_upscale_blocks=2, num_labels=20, num_prefix_tokens=5)
LN2D_EPS = 1e-6  # EomtLayerNorm2d's eps (fixed in transformers)
WEIGHTS_PER_BLOCK = 5  # convt (2, 2, C_out, C_in), convt bias, depthwise (C, 1, 3, 3), LayerNorm weight, bias


def case_config(preset: str) -> SimpleNamespace:
    if preset == "quick":
        return SimpleNamespace(**QUICK_CONFIG)
    from eomt_fast.bench import preset_config

    cfg = preset_config(preset)
    return SimpleNamespace(hidden_size=cfg.hidden_size, num_queries=cfg.num_queries,
                           num_attention_heads=cfg.num_attention_heads, image_size=cfg.image_size,
                           patch_size=cfg.patch_size, num_upscale_blocks=cfg.num_upscale_blocks,
                           num_labels=cfg.num_labels, num_prefix_tokens=cfg.num_prefix_tokens)


# ---- arguments: (tokens, mask head x6, class head x2, upscale blocks x5 each, their ConvTranspose weights in
#      transformers' layout, num_queries, patch_start, grid, heads, blocks) ---------------------------------
def make_args(cfg: SimpleNamespace, batch: int, device: torch.device, dtype: torch.dtype,
              gen: torch.Generator) -> tuple:
    c, g = cfg.hidden_size, cfg.image_size // cfg.patch_size
    patch_start = cfg.num_queries + cfg.num_prefix_tokens
    seq = patch_start + g * g
    tokens = harness.randn(batch, seq, c, device=device, dtype=dtype, gen=gen)  # LayerNorm'ed: about N(0, 1)
    head = [t for _ in range(3) for t in harness.linear_weights(c, c, device, dtype, gen)]
    cls = list(harness.linear_weights(cfg.num_labels + 1, c, device, dtype, gen))
    blocks, hf_convt = [], []
    for _ in range(cfg.num_upscale_blocks):
        convt = harness.randn(2, 2, c, c, device=device, dtype=dtype, gen=gen, std=c**-0.5)  # (2, 2, C_out, C_in)
        blocks += [convt, harness.randn(c, device=device, dtype=dtype, gen=gen, std=0.02),
                   harness.randn(c, 1, 3, 3, device=device, dtype=dtype, gen=gen, std=1 / 3),
                   harness.randn(c, device=device, dtype=dtype, gen=gen, mean=1.0, std=0.1),
                   harness.randn(c, device=device, dtype=dtype, gen=gen, std=0.02)]
        hf_convt.append(convt.permute(3, 2, 0, 1).contiguous())  # nn.ConvTranspose2d's (C_in, C_out, 2, 2)
    return (tokens, *head, *cls, *blocks, *hf_convt, cfg.num_queries, patch_start, g, cfg.num_attention_heads,
            cfg.num_upscale_blocks)


def split_args(args: tuple) -> dict[str, Any]:
    tokens, *weights, num_queries, patch_start, grid, heads, blocks = args
    up = weights[8:8 + WEIGHTS_PER_BLOCK * blocks]
    return dict(tokens=tokens, head=weights[:6], cls=weights[6:8],
                blocks=[up[WEIGHTS_PER_BLOCK * i:WEIGHTS_PER_BLOCK * (i + 1)] for i in range(blocks)],
                hf_convt=weights[8 + WEIGHTS_PER_BLOCK * blocks:], num_queries=num_queries, patch_start=patch_start,
                grid=grid, heads=heads)


# ---- eomt_fast's op sequence (EomtFastForUniversalSegmentation.forward / _query_patch_mask) ----------------
def _pixel_embeddings(ops: dict, a: dict) -> torch.Tensor:
    patches = a["tokens"][:, a["patch_start"]:]
    x = patches.reshape(patches.shape[0], a["grid"], a["grid"], patches.shape[-1])  # a view of the tokens
    for convt, bias, dw, ln_w, ln_b in a["blocks"]:
        x = ops["upscale"](x, convt, bias, dw, ln_w, ln_b, LN2D_EPS)
    return x


def predict_ops(ops: dict, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    a = split_args(args)
    queries = a["tokens"][:, :a["num_queries"]]
    class_logits = F.linear(queries, *a["cls"])
    mask_logits = ops["mask_logits"](ops["mask_head"](queries, *a["head"]), _pixel_embeddings(ops, a))
    return mask_logits, class_logits


def masked_layer_mask_ops(ops: dict, args: tuple) -> torch.Tensor:
    a = split_args(args)
    queries = a["tokens"][:, :a["num_queries"]]
    return ops["grid_attention_mask"](ops["mask_head"](queries, *a["head"]), _pixel_embeddings(ops, a), a["grid"])


def reference_ops() -> dict:
    from eomt_fast import dispatch, kernels

    return {op: getattr(kernels, ref) for op, (ref, _) in dispatch.OPS.items()}


class EomtFast:
    """An op sequence with the ops dispatch resolves for the inputs' device and dtype (backend auto)."""

    def __init__(self, sequence) -> None:
        self.sequence = sequence
        self._ops: dict[tuple, dict] = {}

    def __call__(self, *args):
        from eomt_fast import dispatch

        key = (args[0].device, args[0].dtype)
        if key not in self._ops:
            self._ops[key] = dispatch.resolve("auto", *key)
        return self.sequence(self._ops[key], args)


# ---- transformers (modeling_eomt.py: EomtForUniversalSegmentation.predict and the masked-layer mask) --------
def transformers_predict(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """EomtForUniversalSegmentation.predict, line by line, with its modules written as their functional ops."""
    a = split_args(args)
    logits = a["tokens"]
    query_tokens = logits[:, :a["num_queries"], :]
    class_logits = F.linear(query_tokens, *a["cls"])  # class_predictor
    prefix_tokens = logits[:, a["patch_start"]:, :]
    prefix_tokens = prefix_tokens.transpose(1, 2)
    prefix_tokens = prefix_tokens.reshape(prefix_tokens.shape[0], -1, a["grid"], a["grid"])
    fc1_w, fc1_b, fc2_w, fc2_b, fc3_w, fc3_b = a["head"]  # EomtMaskHead
    query_tokens = F.gelu(F.linear(query_tokens, fc1_w, fc1_b))
    query_tokens = F.gelu(F.linear(query_tokens, fc2_w, fc2_b))
    query_tokens = F.linear(query_tokens, fc3_w, fc3_b)
    channels = prefix_tokens.shape[1]
    for (_, bias, dw, ln_w, ln_b), convt in zip(a["blocks"], a["hf_convt"]):  # EomtScaleBlock of EomtScaleLayers
        prefix_tokens = F.conv_transpose2d(prefix_tokens, convt, bias, stride=2)  # conv1
        prefix_tokens = F.gelu(prefix_tokens)  # activation
        prefix_tokens = F.conv2d(prefix_tokens, dw, padding=1, groups=channels)  # conv2
        prefix_tokens = prefix_tokens.permute(0, 2, 3, 1)  # EomtLayerNorm2d
        prefix_tokens = F.layer_norm(prefix_tokens, (channels,), ln_w, ln_b, LN2D_EPS)
        prefix_tokens = prefix_tokens.permute(0, 3, 1, 2)
    mask_logits = torch.einsum("bqc, bchw -> bqhw", query_tokens, prefix_tokens)
    return mask_logits, class_logits


def transformers_masked_layer_mask(*args) -> torch.Tensor:
    """What EomtForUniversalSegmentation.forward does before a masked layer (attn_mask_probs 1, so no query is
    randomly unmasked): predict(), interpolate to the grid, a (B, S, S) bool mask, the (B, heads, S, S) float
    mask. Returns its query->patch block as booleans (read from the float mask, so that it is built)."""
    a = split_args(args)
    tokens, num_queries, start, grid = a["tokens"], a["num_queries"], a["patch_start"], a["grid"]
    masks_queries_logits, _class_queries_logits = transformers_predict(*args)
    attention_mask = torch.ones(tokens.shape[0], tokens.shape[1], tokens.shape[1], device=tokens.device,
                                dtype=torch.bool)
    interpolated_logits = F.interpolate(masks_queries_logits, size=(grid, grid), mode="bilinear")
    interpolated_logits = interpolated_logits.view(interpolated_logits.size(0), interpolated_logits.size(1), -1)
    attention_mask[:, :num_queries, start:] = interpolated_logits > 0
    attention_mask = attention_mask[:, None, ...].expand(-1, a["heads"], -1, -1)
    attention_mask = attention_mask.float().masked_fill(~attention_mask, -1e9)
    return attention_mask[:, 0, :num_queries, start:] > 0


# ---- cases ----------------------------------------------------------------------------------------------
def _weight_elements(cfg: SimpleNamespace, class_head: bool) -> int:
    c = cfg.hidden_size
    per_block = 4 * c * c + c + 9 * c + 2 * c
    return 3 * (c * c + c) + cfg.num_upscale_blocks * per_block + ((cfg.num_labels + 1) * (c + 1) if class_head else 0)


def cases(quick: bool) -> list[harness.KernelCase]:
    ref = reference_ops()

    def predict_reference(*args):
        return predict_ops(ref, args)

    def mask_reference(*args):
        return masked_layer_mask_ops(ref, args)

    out = []
    for preset, batch in QUICK if quick else FULL:
        cfg = case_config(preset)
        c, q, g = cfg.hidden_size, cfg.num_queries, cfg.image_size // cfg.patch_size
        side = g * 2**cfg.num_upscale_blocks
        seq = q + cfg.num_prefix_tokens + g * g
        tokens = batch * (q + g * g) * c  # the query and patch tokens are read

        def args(device, dtype, gen, cfg=cfg, batch=batch):
            return make_args(cfg, batch, device, dtype, gen)

        common = dict(model=preset, batch=batch, make_args=args)
        out += [
            harness.KernelCase(
                op="predict", shape=f"B{batch}-Q{q}-C{c}-{g}x{g}->{side}x{side}", masking=False,
                flops=sum(harness.predict_flops(cfg, batch).values()),
                elements=tokens + _weight_elements(cfg, True) + batch * q * (side * side + cfg.num_labels + 1),
                reference=predict_reference,
                extra_impls={"eomt_fast": EomtFast(predict_ops), "transformers": transformers_predict},
                notes=[PREDICT_NOTE], **common),
            harness.KernelCase(
                op="masked_layer_mask", shape=f"B{batch}-Q{q}-C{c}-{g}x{g}->{side}x{side}->{g}x{g}-S{seq}",
                masking=True,
                flops=sum(harness.predict_flops(cfg, batch, einsum_side=g, with_class_head=False).values()),
                elements=tokens + _weight_elements(cfg, False), extra_bytes=batch * q * g * g,
                reference=mask_reference,
                extra_impls={"eomt_fast": EomtFast(masked_layer_mask_ops),
                             "transformers": transformers_masked_layer_mask},
                notes=[MASK_NOTE], **common),
        ]
    return out


PREDICT_NOTE = ("predict rows: the final predict() from the LayerNorm'ed tokens (class head, mask head, upscale "
                "blocks, full-resolution mask-logit einsum); eomt_fast = its op sequence with dispatch's ops (Triton "
                "on CUDA, the references on a CPU), eager/compile = the reference ops, transformers = "
                "EomtForUniversalSegmentation.predict transcribed (NCHW ConvTranspose2d/Conv2d, einsum) on the same "
                "weights; FLOP: bench/harness.py predict_flops")
MASK_NOTE = ("masked_layer_mask rows: the attention mask of one masked layer from its LayerNorm'ed input tokens; "
             "eomt_fast/eager/compile = mask head + upscale blocks + grid_attention_mask (einsum at grid "
             "resolution, (B, Q, g*g) booleans); transformers = its predict() (class head and full-resolution "
             "einsum included) + F.interpolate to g x g + (B, S, S) bool mask + the dense (B, heads, S, S) float "
             "mask; every row counts eomt_fast's FLOP (predict without class head, einsum at g x g)")


def main(argv: list[str] | None = None) -> int:
    args = harness.kernel_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    return harness.run_kernel_benchmark(cases(args.quick), args)


if __name__ == "__main__":
    sys.exit(main())
