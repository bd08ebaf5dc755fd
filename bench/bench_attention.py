"""Masked query-patch attention (op ``attention``) at real EoMT shapes.

Implementations: the reference (``attention_ref``, SDPA with the compact (B, Q, P) mask) in eager mode and
under torch.compile; the reference forced onto each ``F.scaled_dot_product_attention`` backend; the
dense-mask path transformers takes (a (B, 1, S, S) float mask, +1 allowed / -1e9 blocked); the Triton
kernel when ``eomt_fast.dispatch.triton_ops()`` has one and CUDA is present; and on CUDA FlexAttention
(``torch.nn.attention.flex_attention`` under torch.compile) with a BlockMask made by ``create_block_mask``
from a mask_mod that reads the compact (B, Q, P) mask. The block mask is made once per input set before
timing (outside the timed region; its creation time is recorded in the row as ``block_mask_ms``).

    python bench/bench_attention.py            # GPU: every shape below
    python bench/bench_attention.py --quick    # CPU: small shapes (seconds)
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import harness
from eomt_fast.kernels import attention_ref

# (preset, batch, layer kind): "query" layers carry the queries (S tokens, maskable), "early" ones do not (S0)
FULL = [("eomt-l-640", 1, "query"), ("eomt-l-640", 1, "early"), ("eomt-l-640", 8, "query"),
        ("eomt-s-640", 1, "query"), ("eomt-b-640", 1, "query"), ("eomt-g-640", 1, "query"),
        ("eomt-l-1280", 1, "query")]
QUICK = [("quick", 1, "query")]  # 1 x 4 heads x 455 tokens x 64: small enough for a CPU
QUICK_DIMS = dict(C=256, H=4, D=64, Q=50, prefix=5, g=20, P=400, S0=405, S=455)


def sdpa_backend(backend: SDPBackend):
    def attention(qkv, num_heads, query_patch_mask=None, patch_start=None):
        with sdpa_kernel([backend]):
            return attention_ref(qkv, num_heads, query_patch_mask, patch_start)

    return attention


def dense_mask_attention(qkv, num_heads, query_patch_mask=None, patch_start=None):
    """What transformers does in a masked layer: an (S, S) float mask per image, every row through one SDPA."""
    batch, seq, three_c = qkv.shape
    head_dim = three_c // 3 // num_heads
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None
    if query_patch_mask is not None:
        allowed = torch.ones(batch, seq, seq, dtype=torch.bool, device=qkv.device)
        allowed[:, : query_patch_mask.shape[1], patch_start:] = query_patch_mask
        mask = allowed[:, None].float().masked_fill(~allowed[:, None], -1e9).to(qkv.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim**-0.5)
    return out.transpose(1, 2).reshape(batch, seq, three_c // 3)


def flex_available(device: torch.device) -> str | None:
    """Why FlexAttention cannot be benchmarked on ``device`` (None: it can)."""
    if device.type != "cuda":
        return "FlexAttention is benchmarked on CUDA only"
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch.nn.attention.flex_attention is not available: {exc}"
    return None


def query_patch_mask_mod(query_patch_mask: torch.Tensor, patch_start: int):
    """The mask_mod of the compact (B, Q, P) mask: rows < Q and columns >= patch_start look the mask up,
    every other (row, column) is allowed. Indices are clamped into the mask, so that no lookup (for the
    rows and columns where the answer does not depend on it, or for the padding of a partial block) reads
    out of bounds."""
    num_queries, num_patches = query_patch_mask.shape[1:]

    def mask_mod(b, h, q_idx, kv_idx):
        row, col = q_idx.clamp(0, num_queries - 1), (kv_idx - patch_start).clamp(0, num_patches - 1)
        looked_up = query_patch_mask[b, row, col]
        return (q_idx >= num_queries) | (kv_idx < patch_start) | looked_up

    return mask_mod


class FlexAttention:
    """``attention_ref``'s signature on FlexAttention: flex_attention under torch.compile (dynamic=False; one
    compile per shape: all mask_mods share one code object, so a new mask is a new input, not a recompile),
    with a BlockMask per query_patch_mask. ``prepare(arg_sets)`` makes the block masks of every input set
    before timing; a mask not seen before is made on the spot (the first, checked call)."""

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        for limit in ("cache_size_limit", "recompile_limit"):  # one compile per shape: many shapes in a run
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        self._create = create_block_mask
        self._create_compiled = torch.compile(create_block_mask)
        self._flex = torch.compile(flex_attention, dynamic=False)
        self.block_masks: dict[tuple, object] = {}
        self.creation_ms: list[float] = []
        self.how = "compiled"

    def _make(self, query_patch_mask: torch.Tensor, seq_len: int, patch_start: int):
        """A new BlockMask of this mask and the ms it took (synchronized)."""
        args = (query_patch_mask_mod(query_patch_mask, patch_start), query_patch_mask.shape[0], None, seq_len, seq_len)
        harness.synchronize(query_patch_mask.device)
        start = time.perf_counter()
        block_mask = None
        if self.how == "compiled":  # torch.compile(create_block_mask), as torch suggests; eager if that fails
            try:
                block_mask = self._create_compiled(*args, device=query_patch_mask.device)
            except Exception as exc:  # noqa: BLE001
                self.how = f"eager ({harness._reason(exc)[:80]} when compiled)"
        if block_mask is None:
            block_mask = self._create(*args, device=query_patch_mask.device)
        harness.synchronize(query_patch_mask.device)
        return block_mask, (time.perf_counter() - start) * 1e3

    def _block_mask(self, query_patch_mask: torch.Tensor, seq_len: int, patch_start: int):
        key = (query_patch_mask.data_ptr(), query_patch_mask._version, tuple(query_patch_mask.shape), seq_len,
               patch_start)
        if key not in self.block_masks:
            self.block_masks[key], ms = self._make(query_patch_mask, seq_len, patch_start)
            self.creation_ms.append(ms)
        return self.block_masks[key]

    def __call__(self, qkv, num_heads, query_patch_mask=None, patch_start=None):
        batch, seq, three_c = qkv.shape
        head_dim = three_c // 3 // num_heads
        q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        block_mask = None if query_patch_mask is None else self._block_mask(query_patch_mask, seq, patch_start)
        out = self._flex(q, k, v, block_mask=block_mask, scale=head_dim**-0.5)
        return out.transpose(1, 2).reshape(batch, seq, three_c // 3)

    def prepare(self, arg_sets) -> dict:
        """Make the block masks of every input set now, outside the timed region; returns the row fields that
        say how, and how long one takes (the first includes compiling create_block_mask; block_mask_ms: the
        median of three more made afterwards)."""
        masked = [(qkv, mask, start) for qkv, _, mask, start in arg_sets if mask is not None]
        for qkv, mask, start in masked:
            self._block_mask(mask, qkv.shape[1], start)
        if not masked:
            return {}
        qkv, mask, start = masked[0]
        again = [self._make(mask, qkv.shape[1], start)[1] for _ in range(3)]
        return {"block_mask": self.how, "block_mask_ms": harness.percentile(again, 0.5),
                "block_mask_first_ms": self.creation_ms[0], "block_masks": len(self.block_masks)}


def cases(quick: bool, device: torch.device) -> list[harness.KernelCase]:
    flex_missing = flex_available(device)
    if flex_missing and device.type == "cuda":
        print(f"flex-attention skipped: {flex_missing}")
    backends = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    if device.type == "cuda":
        backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    out = []
    for preset, batch, kind in QUICK if quick else FULL:
        d = QUICK_DIMS if preset == "quick" else harness.eomt_dims(preset)
        seq = d["S"] if kind == "query" else d["S0"]
        for masking in ((False, True) if kind == "query" else (False,)):
            def make_args(device, dtype, gen, d=d, seq=seq, masking=masking, batch=batch, kind=kind):
                qkv = harness.randn(batch, seq, 3 * d["C"], device=device, dtype=dtype, gen=gen)
                if not masking:
                    return (qkv, d["H"], None, None)
                mask = harness.random_query_patch_mask(batch, d["Q"], d["g"], device, gen)
                return (qkv, d["H"], mask, d["Q"] + d["prefix"])

            extra = {f"sdpa-{b.name.lower().replace('_attention', '')}": sdpa_backend(b) for b in backends}
            if masking:
                extra["sdpa-dense-mask (transformers)"] = dense_mask_attention
            notes = []
            if not flex_missing:
                extra["flex-attention"] = FlexAttention()
                notes.append(FLEX_NOTE)
            out.append(harness.KernelCase(
                op="attention", model=preset, shape=f"B{batch}-H{d['H']}-S{seq}-D{d['D']}", batch=batch,
                masking=masking, flops=harness.attention_flops(batch, seq, seq, d["C"]),
                elements=batch * seq * 4 * d["C"], extra_bytes=batch * d["Q"] * d["P"] if masking else 0,
                make_args=make_args, extra_impls=extra, notes=notes))
    return out


FLEX_NOTE = ("attention rows, flex-attention: torch.nn.attention.flex_attention under torch.compile (dynamic=False), "
             "masking on with a BlockMask from create_block_mask (itself under torch.compile; 128 x 128 blocks, "
             "one mask for all heads) of a mask_mod reading the compact (B, Q, P) mask; the block masks of all "
             "input sets are made before timing, outside the timed region: block_mask_ms in the row is the "
             "median time to make one (block_mask_first_ms: the first, with compiling)")


def main(argv: list[str] | None = None) -> int:
    args = harness.kernel_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return harness.run_kernel_benchmark(cases(args.quick, device), args)


if __name__ == "__main__":
    sys.exit(main())
