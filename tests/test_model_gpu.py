"""The fast model end to end on a GPU (marked ``gpu``: skipped without CUDA).

ViT-S/B/L-shaped EoMT (the bench presets: patch 16, 4 registers, 200 queries, 133 classes, 640 x 640) with
random weights built with transformers; ours (backend='triton', every op a Triton kernel) in bf16 / fp16
against transformers in fp32, masking off (attn_mask_probs zeros, as released checkpoints) and on (ones):

- error: for each output, the mean |ours - transformers fp32| is at most twice transformers' own error in
  that dtype (transformers run in bf16 / fp16 against its fp32 run), plus a tiny floor;
- predictions: the mask argmax (per pixel, over the queries, of masks_queries_logits) and the class argmax
  (per query, over the classes, of class_queries_logits) agree with transformers fp32 on >= 99.9% of the
  "decided" pixels and queries (those whose fp32 top-1 / top-2 margin exceeds 8 x the 99.9th percentile of
  transformers' own low-precision error: random weights leave many near-ties that no low-precision
  implementation can call), and over all pixels and queries ours disagrees at most twice as often as
  transformers in that dtype does (+ 0.1%);
- CUDA graphs (``cuda_graphs=True``): replay equals the eager forward bit for bit, across inputs and shapes,
  without changing outputs already returned; ``cuda_graphs="auto"`` (the default) too, and inside a capture of
  the caller's own it runs eager;
- torch.compile(fullgraph=True) equals the eager forward (inductor compiles the glue between the ops:
  rounding-level differences only);
- memory: the forward's peak allocation grows like the sequence, not its square.

The helpers run on any device; ``test_agreement_helpers_on_cpu`` exercises them on a tiny model on the CPU.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from eomt_fast import EomtFastForUniversalSegmentation
from eomt_fast.bench import hf_config_kwargs, preset_config
from eomt_fast.testing import TEST_CONFIGS, random_hf_model

pytest.importorskip("transformers")

OUTPUTS = ("masks_queries_logits", "class_queries_logits", "last_hidden_state")
PRESETS = ("eomt-s-640", "eomt-b-640", "eomt-l-640", "eomt-dinov3-l-640")  # DINOv3: the rotary embeddings too
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
BATCH = 2  # > 1: the layers before the queries run on row-split slices of the token buffer
AGREEMENT = 0.999
DECIDED_MARGIN = 8.0  # x the 99.9th percentile of transformers' own low-precision error


# ---- helpers (device independent) ------------------------------------------------------------------------

def mean_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return (got.double() - truth.double()).abs().mean().item()


def top2_margin(logits: torch.Tensor, dim: int) -> torch.Tensor:
    top = logits.double().topk(2, dim=dim).values
    return top.select(dim, 0) - top.select(dim, 1)


def agreement(ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor, dim: int) -> dict[str, float]:
    """Argmax over ``dim`` of our and transformers' low-precision logits against the fp32 truth: the share
    that agrees over all positions, over the decided ones, and the share decided."""
    reference = truth.argmax(dim)
    ours_ok = ours.argmax(dim) == reference
    theirs_ok = theirs.argmax(dim) == reference
    own_error = (theirs.double() - truth.double()).abs().flatten()
    if own_error.numel() > 2**24:  # torch.quantile's input limit
        own_error = own_error[torch.randperm(own_error.numel(), device=own_error.device)[:2**24]]
    threshold = DECIDED_MARGIN * torch.quantile(own_error.float(), 0.999).item()
    decided = top2_margin(truth, dim) > threshold
    return {
        "ours": ours_ok.double().mean().item(),
        "theirs": theirs_ok.double().mean().item(),
        "ours_decided": ours_ok[decided].double().mean().item() if decided.any() else 1.0,
        "decided": decided.double().mean().item(),
        "threshold": threshold,
    }


def check_against_transformers(ours, theirs, truth, label: str) -> None:
    """The error bound and the prediction agreement of the module docstring."""
    for name in OUTPUTS:
        got, own, ref = getattr(ours, name), getattr(theirs, name), getattr(truth, name)
        assert got.shape == ref.shape and got.dtype == own.dtype, (label, name)
        assert torch.isfinite(got).all(), f"{label} {name}: non-finite values"
        our_err, their_err = mean_error(got, ref), mean_error(own, ref)
        floor = 1e-3 * ref.double().abs().mean().item()
        assert our_err <= 2 * their_err + floor, (f"{label} {name}: mean error {our_err:.3g} > 2 x transformers' "
                                                  f"{their_err:.3g} + {floor:.2g}")
    for name, dim in (("masks_queries_logits", 1), ("class_queries_logits", -1)):
        a = agreement(getattr(ours, name), getattr(theirs, name), getattr(truth, name), dim)
        text = (f"{label} {name} argmax: ours {a['ours']:.5f}, transformers {a['theirs']:.5f}, ours on the "
                f"{a['decided']:.1%} decided {a['ours_decided']:.5f} (margin > {a['threshold']:.3g})")
        assert a["decided"] >= 0.1, text  # the decided set is not empty by construction
        assert a["ours_decided"] >= AGREEMENT, text
        assert 1 - a["ours"] <= 2 * (1 - a["theirs"]) + (1 - AGREEMENT), text


def assert_identical(got, expected, label: str) -> None:
    for name in OUTPUTS:
        a, b = getattr(got, name), getattr(expected, name)
        assert a.shape == b.shape and a.dtype == b.dtype, (label, name)
        assert torch.equal(a, b), f"{label} {name}: max difference {(a.double() - b.double()).abs().max():.3g}"


def relative_difference(got, expected) -> float:
    return max((getattr(got, n).double() - getattr(expected, n).double()).abs().max().item()
               / getattr(expected, n).double().abs().max().item() for n in OUTPUTS)


def set_masking(models, on: bool) -> None:
    for model in models:
        with torch.no_grad():
            model.attn_mask_probs.fill_(1.0 if on else 0.0)
        if isinstance(model, EomtFastForUniversalSegmentation):
            model.masking_probs()


def test_agreement_helpers_on_cpu():
    """The helpers above on a tiny model (plain path on the CPU, bf16 against fp32): they run, and they fail a
    model whose mask logits are off by a bias on one query."""
    hf32 = random_hf_model(seed=1, dtype=torch.float32, attn_mask_probs=[1.0, 1.0], **TEST_CONFIGS["small_r4"])
    hf_low = copy.deepcopy(hf32).to(torch.bfloat16)
    ours = EomtFastForUniversalSegmentation.from_hf(hf_low, backend="torch")
    x = torch.randn(BATCH, 3, 64, 64)
    with torch.no_grad():
        truth, theirs, got = hf32(x), hf_low(x.bfloat16()), ours(x.bfloat16())
    check_against_transformers(got, theirs, truth, "cpu small_r4 bf16")
    a = agreement(got.masks_queries_logits, theirs.masks_queries_logits, truth.masks_queries_logits, 1)
    assert a["ours_decided"] >= AGREEMENT and a["decided"] >= 0.1, a
    got.masks_queries_logits[:, 0] += 100.0  # query 0 wins every pixel
    with pytest.raises(AssertionError, match="mean error"):
        check_against_transformers(got, theirs, truth, "broken")
    a = agreement(got.masks_queries_logits, theirs.masks_queries_logits, truth.masks_queries_logits, 1)
    assert a["ours"] < 0.5 and a["ours_decided"] < AGREEMENT, a


# ---- GPU ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def transformers_fp32(preset: str):
    """transformers' model of a preset in fp32 on the GPU (two presets at a time: EoMT-L is 1.2 GB)."""
    torch.cuda.empty_cache()
    config = preset_config(preset)
    return random_hf_model(seed=7, dtype=torch.float32, model_type=config.model_type, **hf_config_kwargs(config)).cuda()


def pixel_values(preset: str, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    size = preset_config(preset).image_size
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(batch, 3, size, size, device="cuda", generator=gen)


def build(preset: str, dtype: torch.dtype, masking: bool):
    """(transformers fp32, transformers in dtype, ours in dtype on the Triton kernels), same weights."""
    hf32 = transformers_fp32(preset)
    hf_low = copy.deepcopy(hf32).to(dtype)
    ours = EomtFastForUniversalSegmentation.from_hf(hf_low, backend="triton", cuda_graphs=False)  # eager
    set_masking([hf32, hf_low, ours], masking)
    return hf32, hf_low, ours


@pytest.mark.gpu
@pytest.mark.parametrize("masking", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("dtype", list(LOW), ids=list(LOW))
@pytest.mark.parametrize("preset", PRESETS)
def test_matches_transformers_gpu(preset, dtype, masking):
    hf32, hf_low, ours = build(preset, LOW[dtype], masking)
    assert all(p.impl == "triton" for p in ours.op_paths())
    x = pixel_values(preset)
    before = x.clone()
    with torch.no_grad():
        truth = hf32(x)
        theirs = hf_low(x.to(LOW[dtype]))
    got = ours(x.to(LOW[dtype]))
    assert torch.equal(x, before)
    check_against_transformers(got, theirs, truth, f"{preset} {dtype} masking {'on' if masking else 'off'}")


@pytest.mark.gpu
def test_hidden_states_and_attentions_gpu():
    """output_hidden_states / output_attentions on the kernels (EoMT-S, bf16, masking on): every entry within
    twice transformers' own bf16 error of its fp32 run (attentions: eager attention, the one returning them)."""
    hf32, hf_low, ours = build("eomt-s-640", torch.bfloat16, True)
    hf32 = copy.deepcopy(hf32)  # the cached fp32 model stays sdpa for the other tests
    for model in (hf32, hf_low):
        model.set_attn_implementation("eager")
    x = pixel_values("eomt-s-640")
    with torch.no_grad():
        truth = hf32(x, output_hidden_states=True, output_attentions=True)
        theirs = hf_low(x.bfloat16(), output_hidden_states=True, output_attentions=True)
    got = ours(x.bfloat16(), output_hidden_states=True, output_attentions=True)
    for field in ("hidden_states", "attentions"):
        assert len(getattr(got, field)) == len(getattr(truth, field)), field
        for index, (a, b, ref) in enumerate(zip(getattr(got, field), getattr(theirs, field), getattr(truth, field))):
            assert a.shape == ref.shape and a.dtype == b.dtype, (field, index)
            our_err, their_err = mean_error(a, ref), mean_error(b, ref)
            floor = 1e-3 * ref.double().abs().mean().item()
            assert our_err <= 2 * their_err + floor, f"{field}[{index}]: {our_err:.3g} > 2 x {their_err:.3g} + {floor:.2g}"


@pytest.mark.gpu
@pytest.mark.parametrize("masking", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("preset", ["eomt-s-640", "eomt-l-640"])
def test_cuda_graph_replay_equals_eager_gpu(preset, masking):
    _, hf_low, eager = build(preset, torch.bfloat16, masking)
    graphed = EomtFastForUniversalSegmentation.from_hf(hf_low, backend="triton", cuda_graphs=True)
    set_masking([graphed], masking)
    x1, x2, x3 = (pixel_values(preset, batch, seed) for batch, seed in ((1, 1), (1, 2), (2, 3)))
    inputs = [t.bfloat16() for t in (x1, x2, x3)]
    first = graphed(inputs[0])  # captures the batch-1 graph
    kept = copy.deepcopy(first)
    assert_identical(first, eager(inputs[0]), f"{preset} capture")
    assert_identical(graphed(inputs[1]), eager(inputs[1]), f"{preset} replay")  # same graph, new input
    assert_identical(first, kept, f"{preset} earlier outputs")  # clones: untouched by the replay
    assert_identical(graphed(inputs[2]), eager(inputs[2]), f"{preset} batch 2")  # a second graph
    assert len(graphed.cuda_graphs) == 2
    fp32_input = x1.clone()
    assert_identical(graphed(fp32_input), eager(inputs[0]), f"{preset} fp32 input cast into the static input")
    assert torch.equal(fp32_input, x1)


def small_triton_model(device: str, cuda_graphs=False) -> EomtFastForUniversalSegmentation:
    hf = random_hf_model(seed=11, dtype=torch.float32, attn_mask_probs=[1.0, 0.0], **TEST_CONFIGS["small_r4"])
    # triton needs it on CUDA; eager unless asked (the loaders' default is cuda_graphs="auto")
    return EomtFastForUniversalSegmentation.from_hf(hf.to(device), backend="triton", cuda_graphs=cuda_graphs)


@pytest.mark.gpu
def test_direct_runner_recaptures_after_the_weights_move_gpu():
    """A CudaGraphs made directly survives the model's .cpu().cuda(): same key, new weight addresses; its
    replay must read the new weights (a stale graph would read freed memory: garbage or a fault)."""
    from eomt_fast.cuda_graphs import CudaGraphs

    model = small_triton_model("cuda")
    graphs = CudaGraphs(model)
    x = torch.randn(1, 3, 64, 64, device="cuda")
    assert_identical(graphs(x), model(x), "capture")
    model.cpu().cuda()
    torch.cuda.empty_cache()
    with torch.no_grad():
        model.norm_weight.mul_(2.0)  # new values too: a replay of the old graph could not give these
    assert_identical(graphs(x), model(x), "after .cpu().cuda()")


@pytest.mark.gpu
def test_graphs_called_from_threads_on_their_own_streams_gpu():
    """Threads on streams of their own share one runner: each call waits for the previous one's clones on the
    GPU before its input copy overwrites the static input, so every thread gets its own input's outputs."""
    import threading

    model = small_triton_model("cuda")
    model.enable_cuda_graphs()
    inputs = [torch.randn(2, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
              for i in range(6)]
    expected = [model._output(*model._forward_tensors(x), None) for x in inputs]  # eager, same kernels
    model(inputs[0])  # captured
    results: dict[int, object] = {}

    def work(indices: list[int]) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            for i in indices:
                results[i] = model(inputs[i])
            torch.cuda.current_stream().synchronize()

    threads = [threading.Thread(target=work, args=(list(range(k, 6, 2)),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert_identical(results[i], expected[i], f"call {i}")

    # a capture (batch 3: a new graph) while another thread allocates and synchronises on the same GPU: the
    # capture's errors are its own thread's only (capture_error_mode="thread_local")
    stop = threading.Event()

    def busy() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            size = 256
            while not stop.is_set():
                size += 8
                torch.full((size, size), 0.5, device="cuda").sum().item()  # no RNG: the capture holds the default generator

    other = threading.Thread(target=busy)
    other.start()
    try:
        x3 = torch.randn(3, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(9))
        got = model(x3)
    finally:
        stop.set()
        other.join()
    assert len(model.cuda_graphs) == 2
    assert_identical(got, model._output(*model._forward_tensors(x3), None), "captured beside a busy thread")


@pytest.mark.gpu
def test_auto_graphs_the_second_call_and_runs_eager_inside_a_callers_capture_gpu():
    """cuda_graphs="auto" (the loaders' default): a shape's first call runs eager, its second captures, later ones
    replay, all bit for bit the eager forward. Inside a capture of the caller's own, the forward runs eager, so
    its kernels become part of that graph (a nested capture would fail), and the caller's replay computes it."""
    model = small_triton_model("cuda", cuda_graphs="auto")
    assert model.cuda_graphs is not None and model.cuda_graphs.auto
    inputs = [torch.randn(2, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
              for i in range(4)]
    expected = [model._output(*model._forward_tensors(x), None) for x in inputs]  # eager, same kernels
    for i, captured in ((0, 0), (1, 1), (2, 1)):
        assert_identical(model(inputs[i]), expected[i], f"auto call {i}")
        assert len(model.cuda_graphs) == captured, i

    static = inputs[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model(static)  # the caller's warm-up, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(static)
    static.copy_(inputs[3])
    graph.replay()
    torch.cuda.synchronize()
    assert_identical(out, expected[3], "inside the caller's capture")
    assert len(model.cuda_graphs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_model_on_a_device_that_is_not_current_gpu():
    """Triton launches on the current device: a model on cuda:1 while cuda:0 is current must still run its
    kernels (and its CUDA graphs) on cuda:1, with the result of the same model on cuda:0 (fp32)."""
    reference = small_triton_model("cuda:0")
    other = small_triton_model("cuda:1")
    graphed = small_triton_model("cuda:1")
    graphed.enable_cuda_graphs()
    x = torch.randn(2, 3, 64, 64, device="cuda:0")
    torch.cuda.set_device(0)
    expected = reference(x)
    for model in (other, graphed):
        got = model(x.to("cuda:1"))
        assert torch.cuda.current_device() == 0 and got.masks_queries_logits.device == torch.device("cuda:1")
        for name in OUTPUTS:  # each device autotunes on its own: tiles, and so roundings, may differ
            torch.testing.assert_close(getattr(got, name).cpu(), getattr(expected, name).cpu(),
                                       rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("masking", [False, True], ids=["unmasked", "masked"])
def test_compile_equals_eager_gpu(masking):
    """torch.compile(fullgraph=True, inductor) of the whole model: the Triton ops stay opaque custom ops
    (their mutating forms functionalised), inductor compiles the glue."""
    _, _, ours = build("eomt-s-640", torch.bfloat16, masking)
    x = pixel_values("eomt-s-640").bfloat16()
    expected = ours(x)  # eager first: resolves the ops and the masking probabilities a compiled graph reads
    compiled = torch.compile(ours, fullgraph=True)
    got = compiled(x)
    assert relative_difference(got, expected) <= 2e-2, relative_difference(got, expected)
    for name, dim in (("masks_queries_logits", 1), ("class_queries_logits", -1)):
        same = (getattr(got, name).argmax(dim) == getattr(expected, name).argmax(dim)).double().mean().item()
        assert same >= 0.99, (name, same)
    again = compiled(pixel_values("eomt-s-640", seed=5).bfloat16())  # no recompilation needed, new values
    assert relative_difference(again, ours(pixel_values("eomt-s-640", seed=5).bfloat16())) <= 2e-2


@pytest.mark.gpu
def test_peak_memory_grows_like_the_sequence_gpu():
    """EoMT-L at 640 and 1280 px (S = 1805 and 6605 tokens, P 4x), masking on, bf16: the memory a forward
    allocates above the weights and input (mostly the mask side: pixel embeddings at 4g x 4g) grows like the
    tokens (about 4x), nowhere near S^2 (13.4x); and it stays below the fp32 S x S scores of its 16 heads."""
    def peak(size: int) -> tuple[int, int]:
        config = preset_config("eomt-l-640")
        kwargs = dict(hf_config_kwargs(config), image_size=size)
        hf = random_hf_model(seed=3, dtype=torch.bfloat16, attn_mask_probs=[1.0] * 4, **kwargs).cuda()
        ours = EomtFastForUniversalSegmentation.from_hf(hf, backend="triton", cuda_graphs=False)  # eager memory
        del hf
        x = torch.randn(1, 3, size, size, device="cuda", dtype=torch.bfloat16)
        ours(x)  # autotuning first
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ours(x)
        torch.cuda.synchronize()
        seq = ours.config.num_queries + ours.config.num_prefix_tokens + ours.config.num_patches
        return seq, torch.cuda.max_memory_allocated() - before

    small_seq, small = peak(640)
    seq, big = peak(1280)
    ratio = seq / small_seq
    assert big / small < (ratio + ratio**2) / 2, (small, big)  # nearer linear (3.7) than quadratic (13.4)
    assert big < 16 * seq * seq * 4 / 2, (big, seq)  # half the fp32 scores of the 16 heads
