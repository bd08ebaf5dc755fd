"""The benchmark harness (bench/harness.py), `eomt-fast bench` and the kernel scripts, on the CPU.

Fast by construction: the tiny preset, no torch.compile, a fraction of a second of timing per row.
"""

import importlib
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

from eomt_fast import bench, cli
from eomt_fast.bench import load_harness, preset_config
from eomt_fast.kernels.upscale import prepare_convt_weight

harness = load_harness()
BENCH_DIR = Path(harness.__file__).parent
G = 1e9


# ---- FLOP count ---------------------------------------------------------------------------------------
def test_flops_of_eomt_l_640_match_performance_md():
    """docs/performance.md: EoMT-L/640, batch 1, masking off, 2 FLOP per multiply-add."""
    cfg = preset_config("eomt-l-640")
    early, late = harness.layer_flops(cfg, 1, 1605), harness.layer_flops(cfg, 1, 1805)
    assert early["linear"] == pytest.approx(40.4 * G, rel=0.01)
    assert early["attention"] == pytest.approx(10.6 * G, rel=0.01)
    assert late["linear"] == pytest.approx(45.4 * G, rel=0.01)
    assert late["attention"] == pytest.approx(13.4 * G, rel=0.01)
    parts = harness.model_flops(cfg, batch=1)
    assert parts["layers_linear"] + parts["layers_attention"] == pytest.approx((1019 + 235) * G, rel=0.01)
    assert parts["patch_embed"] == pytest.approx(2.5 * G, rel=0.02)
    assert parts["predict"] == pytest.approx(79 * G, rel=0.02)
    assert parts["total"] == pytest.approx(1.34e12, rel=0.01)
    predict = harness.predict_flops(cfg, 1)
    assert predict["convt"] == pytest.approx((13.4 + 53.7) * G, rel=0.01)
    assert predict["einsum"] == pytest.approx(10.5 * G, rel=0.01)
    assert predict["mask_head"] == pytest.approx(1.3 * G, rel=0.05)


def test_masked_flops_add_one_grid_resolution_predict_per_masked_layer():
    cfg = preset_config("eomt-l-640")
    off, on = harness.model_flops(cfg, 1, 0), harness.model_flops(cfg, 1, cfg.num_blocks)
    assert on["total"] - off["total"] == pytest.approx(0.27e12, rel=0.05)  # "about +0.27 T"
    assert on["total"] / off["total"] <= 1.25  # "need not cost more than about 1.2x"
    assert harness.model_flops(cfg, 8, 4)["total"] == pytest.approx(8 * on["total"], rel=1e-12)


def test_flops_of_swiglu_and_small_models():
    g = preset_config("eomt-g-640")
    hidden = g.mlp_hidden_size  # (int(6144 * 2/3) + 7) // 8 * 8 = 4096
    assert harness.layer_flops(g, 1, 1605)["linear"] == pytest.approx(
        2 * 1605 * 1536 * (3 * 1536 + 1536 + 2 * hidden + hidden), rel=1e-12)
    dinov3 = preset_config("eomt-dinov3-l-640")  # EoMT-DINOv3: intermediate_size is the MLP width
    assert harness.layer_flops(dinov3, 1, 1805)["linear"] == pytest.approx(
        2 * 1805 * 1024 * (4 * 1024 + 2 * dinov3.intermediate_size), rel=1e-12)
    tiny = preset_config("tiny")
    assert 0 < harness.model_flops(tiny)["total"] < harness.model_flops(preset_config("eomt-s-640"))["total"]


# ---- results files -------------------------------------------------------------------------------------
ENV = {"device": "Test CPU", "device_slug": "cpu-test", "torch": "2.x", "triton": "3.x", "transformers": "5.x",
       "python": "3.x", "commit": "abc123", "dirty": False, "date": "2030-01-02",
       "timestamp": "2030-01-02T03:04:05+00:00"}
CEILINGS = {"matmul_tflops": 0.5, "copy_tbps": 0.02, "matmul": "test", "copy": "test"}


def row(impl="eomt_fast", median=10.0, masking=False, benchmark="model", **extra):
    return {"benchmark": benchmark, "model": "eomt-l-640", "batch": 1, "dtype": "bfloat16", "masking": masking,
            "impl": impl, "median_ms": median, "p20_ms": median * 0.9, "p80_ms": median * 1.1, **extra}


def test_results_are_written_and_reload_with_the_schema(tmp_path):
    path = harness.write_results([row(), row("transformers-sdpa", 20.0)], ENV, CEILINGS, tmp_path,
                                 notes=["a note"], command="test")
    assert path == tmp_path / "2030-01-02_cpu-test.json"
    doc = json.loads(path.read_text())
    harness.validate(doc)
    for key, kind in {"device": str, "torch": str, "triton": str, "commit": str, "date": str}.items():
        assert isinstance(doc[key], kind)
    assert isinstance(doc["ceilings"]["matmul_tflops"], float) and isinstance(doc["ceilings"]["copy_tbps"], float)
    for r in doc["results"]:
        assert isinstance(r["batch"], int) and isinstance(r["masking"], bool)
        assert all(isinstance(r[k], float) for k in ("median_ms", "p20_ms", "p80_ms"))
        assert r["commit"] == "abc123"
    md = path.with_suffix(".md").read_text()
    assert "| eomt-l-640 | 1 | bfloat16 | off | transformers-sdpa | 20 [18-22]" in md and "2.00x" in md
    assert "a note" in md and "CPU numbers" in md
    if importlib.util.find_spec("matplotlib") is not None:  # the chart is skipped without it
        assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("damage", ["missing_device", "batch_str", "masking_int", "nan_median", "p20_above",
                                    "no_ceiling", "results_dict"])
def test_validate_rejects_broken_documents(damage):
    doc = {"device": "d", "torch": "t", "triton": "t", "commit": "c", "date": "d", "ceilings": dict(CEILINGS),
           "results": [row()]}
    r = doc["results"][0]
    if damage == "missing_device":
        del doc["device"]
    elif damage == "batch_str":
        r["batch"] = "1"
    elif damage == "masking_int":
        r["masking"] = 1
    elif damage == "nan_median":
        r["median_ms"] = math.nan
    elif damage == "p20_above":
        r["p20_ms"] = 11.0
    elif damage == "no_ceiling":
        del doc["ceilings"]["copy_tbps"]
    else:
        doc["results"] = {}
    with pytest.raises(harness.SchemaError):
        harness.validate(doc)


def test_runs_on_the_same_day_and_device_merge_by_key(tmp_path):
    harness.write_results([row("eomt_fast", 10.0), row("transformers-sdpa", 20.0)], ENV, CEILINGS, tmp_path,
                          command="first")
    later = dict(ENV, timestamp="2030-01-02T05:00:00+00:00", commit="def456")
    path = harness.write_results(
        [row("eomt_fast", 8.0), row("eomt_fast", 9.0, masking=True)], later, dict(CEILINGS, matmul_tflops=0.6),
        tmp_path, skipped=[row("transformers-sdpa", 1.0) | {"reason": "wrong result"}], command="second")
    doc = harness.load(path)
    by_key = {(r["impl"], r["masking"]): r for r in doc["results"]}
    assert set(by_key) == {("eomt_fast", False), ("eomt_fast", True)}  # sdpa refused by the later run
    assert by_key[("eomt_fast", False)]["median_ms"] == 8.0 and by_key[("eomt_fast", False)]["commit"] == "def456"
    assert [s["impl"] for s in doc["skipped"]] == ["transformers-sdpa"]
    assert [r["command"] for r in doc["runs"]] == ["first", "second"]
    assert doc["commit"] == "def456" and doc["ceilings"]["matmul_tflops"] == 0.6
    # a third run that times sdpa again brings it back; rewriting the same run (same timestamp) keeps one entry
    third = dict(ENV, timestamp="2030-01-02T06:00:00+00:00")
    harness.write_results([row("transformers-sdpa", 19.0)], third, CEILINGS, tmp_path, command="third")
    harness.write_results([row("transformers-sdpa", 18.0)], third, CEILINGS, tmp_path, command="third")
    doc = harness.load(path)
    assert len(doc["results"]) == 3 and doc["skipped"] == []
    assert [r["command"] for r in doc["runs"]] == ["first", "second", "third"]


def test_peak_memory_fields_are_mib_or_absent(tmp_path):
    """CUDA rows hold peak memory in MiB (shown in the markdown); CPU rows hold none (an empty cell)."""
    rows = [row(peak_mem_mb=1234.4, forward_mem_mb=234.4, weights_mb=1000.0), row("transformers-sdpa", 20.0)]
    path = harness.write_results(rows, ENV, CEILINGS, tmp_path, command="test")
    md = path.with_suffix(".md").read_text()
    assert "peak MiB (CUDA)" in md
    assert "| 1234 |" in md and md.splitlines()[[i for i, line in enumerate(md.splitlines())
                                                  if "transformers-sdpa" in line][0]].endswith("|  |")
    for bad in (-1.0, math.nan, "12", 12):
        doc = {"device": "d", "torch": "t", "triton": "t", "commit": "c", "date": "d", "ceilings": dict(CEILINGS),
               "results": [row(peak_mem_mb=bad)]}
        with pytest.raises(harness.SchemaError, match="peak_mem_mb"):
            harness.validate(doc)
    harness.validate({"device": "d", "torch": "t", "triton": "t", "commit": "c", "date": "d",
                      "ceilings": dict(CEILINGS), "results": [row(peak_mem_mb=None)]})


def test_timing_statistics():
    assert harness.percentile([3.0, 1.0, 2.0, 4.0, 5.0], 0.5) == 3.0
    assert harness.percentile([1.0, 2.0], 0.2) == pytest.approx(1.2)
    timing = harness.time_cpu(lambda: sum(range(1000)), budget_s=0.05, min_repeats=5)
    assert timing.samples >= 5 and 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert harness.rotation_count(1 << 20, 50 << 20) == 64  # small inputs: many copies, capped
    assert harness.rotation_count(10 << 20, 50 << 20) == 10  # 2x the cache in total
    assert harness.rotation_count(60 << 20, 50 << 20) == 1  # larger than the cache: no copies



def test_graph_or_not_is_judged_on_a_second_call(monkeypatch):
    """A first call that compiles and autotunes (slow) must not send a microsecond op to do_bench, which then
    times its host launch (H200, 2026-12-04: kernels 5-20x 'slower' than they were)."""
    calls, chosen = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(harness, "time_cuda", lambda fn, cudagraph=False, **kw: chosen.append(cudagraph))

    def op():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.01)  # the first call: compiling

    harness.time_call(op, [()], torch.device("cuda"))
    assert chosen == [True] and len(calls) == 2
    calls.clear()
    harness.time_call(lambda: time.sleep(0.002), [()], torch.device("cuda"))  # slow every time: no graph
    assert chosen == [True, False]


def test_profile_host_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    module = importlib.import_module("profile_host")
    report = tmp_path / "report.txt"
    assert module.main(["--model", "tiny", "--device", "cpu", "--calls", "2", "--top", "12", "--out", str(report)]) == 0
    text = report.read_text()
    assert text == capsys.readouterr().out
    assert "eager forward:" in text and "by own time" in text and "by inclusive time" in text
    assert "_forward_tensors" in text  # the model's forward is in the profile


# ---- eomt-fast bench ---------------------------------------------------------------------------------------
TINY = ["bench", "--model", "tiny", "--no-compile", "--quick", "--budget", "0.1", "--batch", "1"]


def test_bench_tiny_end_to_end_writes_eomt_fast_and_transformers_rows(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert cli.main([*TINY, "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "eomt_fast speedup" in out and "TFLOP/s" in out
    (path,) = tmp_path.glob("*.json")
    doc = harness.load(path)
    got = {(r["impl"], r["masking"]) for r in doc["results"]}
    expected = {(impl, masking) for impl in ("eomt_fast", "transformers-eager", "transformers-sdpa")
                for masking in (False, True)}
    assert got == expected
    for r in doc["results"]:
        assert r["benchmark"] == "model" and r["model"] == "tiny" and r["dtype"] == "float32"
        assert r["tflops"] > 0 and r["images_per_s"] > 0 and r["max_rel_err"] <= 1e-3
    flops = {r["masking"]: r["flops"] for r in doc["results"]}
    assert flops[True] > flops[False]
    assert path.with_suffix(".md").exists() and path.with_suffix(".png").exists()


def test_cuda_only_rows_are_left_out_on_a_cpu_with_a_note():
    import argparse

    args = argparse.Namespace(impls=None, no_compile=True)
    names, notes = bench._selected_impls(args, torch.device("cpu"))
    assert "eomt_fast" in names and "eomt_fast-cuda-graphs" not in names
    assert any("cuda-graphs" in note and "CUDA only" in note for note in notes)
    names, _ = bench._selected_impls(argparse.Namespace(impls=None, no_compile=True), torch.device("cuda"))
    assert names[:2] == ["eomt_fast", "eomt_fast-cuda-graphs"]  # plan() only: nothing runs on the device here


@pytest.mark.gpu
def test_bench_tiny_on_cuda_has_cuda_graph_rows_and_peak_memory(tmp_path):
    """On a GPU: the eomt_fast-cuda-graphs row next to eomt_fast, and peak memory (MiB) on every row."""
    pytest.importorskip("transformers")
    assert cli.main(["bench", "--model", "tiny", "--no-compile", "--quick", "--batch", "1", "2",
                     "--impls", "eomt_fast", "eomt_fast-cuda-graphs", "transformers-sdpa",
                     "--results-dir", str(tmp_path)]) == 0
    doc = harness.load(next(tmp_path.glob("*.json")))
    assert {(r["impl"], r["batch"], r["masking"]) for r in doc["results"]} == {
        (impl, batch, masking) for impl in ("eomt_fast", "eomt_fast-cuda-graphs", "transformers-sdpa")
        for batch in (1, 2) for masking in (False, True)}
    for r in doc["results"]:
        assert r["peak_mem_mb"] > r["weights_mb"] > 0 and r["forward_mem_mb"] > 0, r


def test_bench_refuses_to_time_a_wrong_implementation(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from eomt_fast import kernels

    def wrong_mask_logits(mask_embeddings, pixel_embeddings):  # a kernel with a bug: 10% too large
        return kernels.mask_logits.mask_logits_ref(mask_embeddings, pixel_embeddings) * 1.1

    monkeypatch.setattr(kernels, "mask_logits_ref", wrong_mask_logits)
    rc = cli.main([*TINY, "--masking", "off", "--impls", "eomt_fast", "transformers-sdpa",
                   "--results-dir", str(tmp_path)])
    assert rc == 1
    assert "eomt_fast" in capsys.readouterr().out.split("NOT TIMED")[0].splitlines()[-1]
    doc = harness.load(next(tmp_path.glob("*.json")))
    assert [r["impl"] for r in doc["results"]] == ["transformers-sdpa"]
    (skip,) = doc["skipped"]
    assert skip["impl"] == "eomt_fast" and "MISMATCH" in skip["reason"] and "masks_queries_logits" in skip["reason"]


def test_check_outputs_tolerances():
    class Out:
        def __init__(self, scale=1.0):
            g = torch.Generator().manual_seed(0)
            self.masks_queries_logits = torch.randn(1, 3, 8, 8, generator=g) * scale
            self.class_queries_logits = torch.randn(1, 3, 5, generator=g)
            self.last_hidden_state = torch.randn(1, 10, 4, generator=g)

    ref = Out()
    assert bench.check_outputs(Out(), ref, torch.float32).ok
    assert bench.check_outputs(Out(1 + 1e-4), ref, torch.float32).ok
    bad = bench.check_outputs(Out(1.01), ref, torch.float32)
    assert not bad.ok and bad.worst == "masks_queries_logits" and bad.error == pytest.approx(0.01, rel=0.01)
    assert bench.check_outputs(Out(1.005), ref, torch.float32, masking=True).ok  # a few mask entries may flip
    assert not bench.check_outputs(Out(1.1), ref, torch.float32, masking=True).ok
    assert bench.check_outputs(Out(1.01), ref, torch.bfloat16).ok  # bf16 is compared at bf16's tolerance
    assert bench.check_outputs(Out(1.2), ref, torch.bfloat16, oracle_error=0.15).ok  # 2x transformers' own error
    nan = Out()
    nan.class_queries_logits[0, 0, 0] = math.nan
    assert not bench.check_outputs(nan, ref, torch.float32).ok


def test_presets_have_the_released_dimensions():
    l640 = preset_config("eomt-l-640")
    assert (l640.hidden_size, l640.num_hidden_layers, l640.num_attention_heads, l640.num_blocks) == (1024, 24, 16, 4)
    assert l640.num_queries + l640.num_prefix_tokens + l640.num_patches == 1805
    assert preset_config("eomt-g-1280").grid_size == 80 and preset_config("eomt-g-1280").use_swiglu_ffn
    assert preset_config("eomt-s-640").num_blocks == 3


# ---- kernel scripts --------------------------------------------------------------------------------------
SCRIPTS = {"bench_attention": {"attention"}, "bench_layernorm_mlp": {"layernorm_mlp"},
           "bench_linear": {"layernorm_qkv", "out_projection", "mask_head", "patch_embed"},
           "bench_mask_logits": {"mask_logits", "grid_attention_mask"}, "bench_upscale": {"upscale"},
           "bench_predict": {"predict", "masked_layer_mask"}}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_kernel_script_quick_on_cpu(script, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    module = importlib.import_module(script)
    assert module.main(["--quick", "--no-compile", "--budget", "0.05", "--device", "cpu",
                        "--results-dir", str(tmp_path)]) == 0
    doc = harness.load(next(tmp_path.glob("*.json")))
    assert {r["benchmark"] for r in doc["results"]} == SCRIPTS[script]
    assert all(r["impl"] != "triton" for r in doc["results"])  # Triton kernels are timed on CUDA only
    assert {"eager"} <= {r["impl"] for r in doc["results"]}
    if script == "bench_predict":  # composite ops: eomt_fast's op sequence and transformers' way beside the references
        assert {(r["benchmark"], r["impl"]) for r in doc["results"]} == {
            (op, impl) for op in SCRIPTS[script] for impl in ("eager", "eomt_fast", "transformers")}


def test_kernel_runner_refuses_a_wrong_implementation(tmp_path):
    import argparse

    def make_args(device, dtype, gen):  # mask_head_ref's arguments: x and three (weight, bias) pairs
        x = harness.randn(4, 8, device=device, dtype=dtype, gen=gen)
        return (x, *[t for _ in range(3) for t in harness.linear_weights(8, 8, device, dtype, gen)])

    case = harness.KernelCase(op="mask_head", model="test", shape="x", batch=1, masking=False, flops=1.0,
                              elements=1.0, make_args=make_args, extra_impls={"wrong": lambda x, *weights: x * 2})
    args = argparse.Namespace(device="cpu", dtype=None, filter=None, quick=True, impls=None, no_compile=True,
                              budget=0.05, results_dir=str(tmp_path), no_write=False, threads=None)
    assert harness.run_kernel_benchmark([case], args) == 1
    doc = harness.load(next(tmp_path.glob("*.json")))
    assert [r["impl"] for r in doc["results"]] == ["eager"]
    assert doc["skipped"][0]["impl"] == "wrong" and "wrong result" in doc["skipped"][0]["reason"]


def _bench_module(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module(name)


def test_transformers_predict_transcription_is_transformers_predict(monkeypatch):
    """bench_predict.transformers_predict (and eomt_fast's op sequence) against EomtForUniversalSegmentation.predict
    itself, on the weights of a random transformers model."""
    pytest.importorskip("transformers")
    from eomt_fast.testing import TEST_CONFIGS, random_hf_model

    module = _bench_module("bench_predict", monkeypatch)
    config = TEST_CONFIGS["small_r4"]
    hf = random_hf_model(seed=3, **config)
    g = config["image_size"] // config["patch_size"]
    patch_start = config["num_queries"] + 1 + config["num_register_tokens"]
    tokens = torch.randn(2, patch_start + g * g, config["hidden_size"], generator=torch.Generator().manual_seed(0))
    head = [t for fc in (hf.mask_head.fc1, hf.mask_head.fc2, hf.mask_head.fc3) for t in (fc.weight, fc.bias)]
    layers = hf.upscale_block.block
    blocks = [t for layer in layers for t in (prepare_convt_weight(layer.conv1.weight), layer.conv1.bias,
                                              layer.conv2.weight, layer.layernorm2d.weight, layer.layernorm2d.bias)]
    args = (tokens, *head, hf.class_predictor.weight, hf.class_predictor.bias, *blocks,
            *[layer.conv1.weight for layer in layers], config["num_queries"], patch_start, g,
            config["num_attention_heads"], len(layers))
    with torch.inference_mode():
        expected_masks, expected_classes = hf.predict(tokens)
        for masks, classes in (module.transformers_predict(*args), module.predict_ops(module.reference_ops(), args)):
            torch.testing.assert_close(masks, expected_masks, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(classes, expected_classes, rtol=1e-4, atol=1e-4)
        grid_mask = module.masked_layer_mask_ops(module.reference_ops(), args)
        dense = module.transformers_masked_layer_mask(*args)
    assert grid_mask.shape == dense.shape == (2, config["num_queries"], g * g)
    assert (grid_mask != dense).float().mean() < 0.01  # logits within rounding of 0 may differ


def test_flex_mask_mod_is_the_compact_mask_expanded(monkeypatch):
    """The mask_mod FlexAttention gets (evaluated here directly, on index grids) allows exactly what
    expand_query_patch_mask allows: the query->patch block from the mask, everything else."""
    from eomt_fast.kernels import expand_query_patch_mask

    module = _bench_module("bench_attention", monkeypatch)
    assert module.flex_available(torch.device("cpu")) is not None  # benchmarked on CUDA only
    batch, queries, grid, prefix = 2, 5, 4, 3
    mask = harness.random_query_patch_mask(batch, queries, grid, torch.device("cpu"), torch.Generator().manual_seed(1))
    seq, start = queries + prefix + grid * grid, queries + prefix
    mask_mod = module.query_patch_mask_mod(mask, start)
    rows, cols = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    got = torch.stack([mask_mod(torch.tensor(b), torch.tensor(0), rows, cols) for b in range(batch)])
    expected = torch.ones(batch, seq, seq, dtype=torch.bool)
    expected[:, :queries] = expand_query_patch_mask(mask, seq, start)
    assert torch.equal(got, expected)


# ---- eomt-fast bench --e2e --------------------------------------------------------------------------------
def test_bench_e2e_tiny_panoptic_on_cpu(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    assert cli.main(["bench", "--e2e", "--model", "tiny", "--quick", "--budget", "0.05", "--batch", "1",
                     "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "check: ok" in out and "eomt_fast speedup" in out
    (path,) = tmp_path.glob("*.json")
    doc = harness.load(path)
    assert {(r["impl"], r["masking"]) for r in doc["results"]} == {("eomt_fast", False), ("transformers", False)}
    for r in doc["results"]:
        assert r["benchmark"] == "e2e" and r["model"] == "tiny" and r["shape"] == "panoptic-640x480"
        assert r["segments_per_image"] >= 1 and r["check"].startswith("ok")
        assert r["map_mismatch"] <= bench.MAP_MISMATCH[torch.float32]
        assert r["pixel_values_max_diff"] <= bench.ONE_LEVEL  # tiny resizes 640x480 to 128x96: rounding only
        assert r["images_per_s"] > 0 and min(r["preprocess_ms"], r["model_ms"], r["postprocess_ms"]) > 0
        assert 0 < r["threshold"] < 1 and r["post_params"]["overlap_mask_area_threshold"] == bench.OVERLAP_THRESHOLD
    assert any(bench.E2E_RULE == note for note in doc["notes"])
    assert "## End to end" in path.with_suffix(".md").read_text()


def test_e2e_threshold_and_comparison_rules():
    threshold, margin = bench.gap_threshold([0.9, 0.85, 0.5, 0.45, 0.4, 0.1], target=2)
    assert threshold == pytest.approx(0.675) and margin == pytest.approx(0.175)  # the widest gap near 2 kept
    assert bench.gap_threshold([0.3], target=2)[0] < 0.3  # too few scores: keep them all
    segmentation = torch.zeros(6, 8, dtype=torch.long)
    segmentation[:, 4:] = 1
    result = [{"segmentation": segmentation, "segments_info": [{"id": 0, "label_id": 3, "score": 0.9},
                                                               {"id": 1, "label_id": 5, "score": 0.8}]}]
    pixels = torch.zeros(1, 3, 8, 8)
    ok, line, measured = bench.compare_e2e("panoptic", result, result, pixels, pixels, torch.float32)
    assert ok and line.startswith("ok") and measured["segments_per_image"] == 2
    relabelled = [{**result[0], "segments_info": [dict(result[0]["segments_info"][0], label_id=4),
                                                  result[0]["segments_info"][1]]}]
    assert not bench.compare_e2e("panoptic", relabelled, result, pixels, pixels, torch.float32)[0]
    moved = [{**result[0], "segmentation": torch.ones_like(segmentation)}]  # half the pixels change segment
    assert not bench.compare_e2e("panoptic", moved, result, pixels, pixels, torch.float32)[0]
    off_by_two_levels = pixels + 2 * bench.ONE_LEVEL
    assert not bench.compare_e2e("panoptic", result, result, off_by_two_levels, pixels, torch.float32)[0]


# ---- bench/gpu_suite.sh -----------------------------------------------------------------------------------
FAKE_PYTHON = """#!/bin/sh
# stands in for python3: records each call, answers the suite's probes
echo "$*" >> "$CALLS"
[ "${EOMT_FAST_AUTOTUNE_CACHE-}" = 0 ] && echo "$*" >> "$CALLS.no_autotune_cache"
case "$1" in
    bench/harness.py) echo fake-device ;;
    -c) case "$2" in *xdist*) exit "$HAS_XDIST" ;; *pytest_timeout*) exit "$HAS_TIMEOUT" ;; esac ;;
esac
exit 0
"""


FAKE_TIMEOUT = """#!/bin/sh
# stands in for timeout(1): records its options and duration, then runs the command
echo "$*" | cut -d' ' -f1-5 >> "$TIMEOUTS"
while [ "${1#-}" != "$1" ]; do shift 2; done
shift
exec "$@"
"""


def run_gpu_suite(tmp_path, *steps, has_xdist=True, has_timeout=True, step_timeout=570, first_look_timeout=480,
                  out=None):
    """bench/gpu_suite.sh copied into tmp_path/bench and run there with a fake python: (rc, stderr, the
    python calls it made)."""
    import shutil
    import subprocess

    (tmp_path / "bench").mkdir(exist_ok=True)
    shutil.copy(BENCH_DIR / "gpu_suite.sh", tmp_path / "bench" / "gpu_suite.sh")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    fake_timeout = tmp_path / "bin" / "timeout"  # records its arguments, then runs the command uncut
    fake_timeout.parent.mkdir(exist_ok=True)
    fake_timeout.write_text(FAKE_TIMEOUT)
    fake_timeout.chmod(0o755)
    env = {"PATH": f"{fake_timeout.parent}:/usr/bin:/bin", "PYTHON": str(fake), "TIMEOUTS": str(tmp_path / "timeouts.txt"), "SKIP_INSTALL": "1", "CALLS": str(calls),
           "HAS_XDIST": "0" if has_xdist else "1", "HAS_TIMEOUT": "0" if has_timeout else "1",
           "STEP_TIMEOUT": str(step_timeout), "FIRST_LOOK_TIMEOUT": str(first_look_timeout),
           **({"OUT": str(out)} if out is not None else {})}
    proc = subprocess.run(["bash", str(tmp_path / "bench" / "gpu_suite.sh"), *steps], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr, calls.read_text().splitlines() if calls.exists() else []


def test_gpu_suite_runs_the_gpu_tests_in_parallel_with_a_per_test_timeout(tmp_path):
    """Where pytest-xdist and pytest-timeout are installed (the GPU machine's image), the kernel tests run in 8
    processes and the model tests in 4, each test cut after 240 / 480 s; without them, plain pytest. Each
    step's log lands in bench/results."""
    rc, err, calls = run_gpu_suite(tmp_path, "tests", "model-tests")
    assert rc == 0, err
    pytest_calls = [c for c in calls if c.startswith("-P -m pytest")]
    assert pytest_calls == [
        "-P -m pytest -m gpu -q -rfEs -n 8 --timeout 240 --ignore tests/test_model_gpu.py --durations 25",
        "-P -m pytest -m gpu -q -rfEs -n 4 --timeout 480 tests/test_model_gpu.py --durations 25",
    ]
    logs = sorted(p.name for p in (tmp_path / "bench" / "results").iterdir())
    assert logs == ["fake-device_model-tests.log", "fake-device_tests.log"]
    rc, err, calls = run_gpu_suite(tmp_path, "tests", has_xdist=False, has_timeout=False)
    assert rc == 0, err
    assert [c for c in calls if c.startswith("-P -m pytest")] == [
        "-P -m pytest -m gpu -q -rfEs --ignore tests/test_model_gpu.py --durations 25"]


def test_gpu_suite_refuses_an_unknown_step_before_running_anything(tmp_path):
    rc, err, calls = run_gpu_suite(tmp_path, "tests", "no-such-step")
    assert rc == 2 and "unknown step no-such-step" in err and "first-look" in err
    assert not any(c.startswith("-P -m pytest") for c in calls)


def test_gpu_suite_first_look_fills_what_is_left_with_kernel_benchmarks(tmp_path):
    """first-look: the GPU tests, the EoMT-L/640 model benchmark, then while at least 60 s of the step are left
    the host profile of an eager forward, the MLP, linear and upscale kernel benchmarks without torch.compile
    and the MLP one with it. The tests alone run without the autotune cache."""
    out = tmp_path / "out"
    rc, err, calls = run_gpu_suite(tmp_path, "first-look", out=out)
    assert rc == 0, err
    assert [p.name for p in (out / "bench" / "results").iterdir()] == ["fake-device_first-look.log"]
    runs = [c for c in calls if not c.startswith(("-c ", "bench/harness.py"))]
    assert [c.split(" --")[0] for c in runs] == [
        "-P -m pytest -m gpu -q -rfEs -n 8", "-P -m eomt_fast.cli bench", "bench/profile_host.py",
        "bench/bench_layernorm_mlp.py", "bench/bench_linear.py", "bench/bench_upscale.py",
        "bench/bench_layernorm_mlp.py"]
    assert runs[2].endswith("--out bench/results/fake-device_profile_host.txt")
    assert runs[3].endswith("--filter eomt-l-640 --no-compile") and runs[6].endswith("--filter eomt-l-640")
    assert runs[5].endswith("--filter eomt-l-640 --no-compile")
    no_cache = (tmp_path / "calls.txt.no_autotune_cache").read_text().splitlines()
    assert [c.split(" --")[0] for c in no_cache if not c.startswith("-c ")] == ["-P -m pytest -m gpu -q -rfEs -n 8"]
    rc, err, calls = run_gpu_suite(tmp_path, "first-look", first_look_timeout=50)  # under 60 s left: no extras
    assert rc == 0, err
    assert not any(c.startswith(("bench/bench_", "bench/profile_host")) for c in calls)


def test_gpu_suite_first_look_copies_to_out_after_each_command_and_counts_from_the_start(tmp_path):
    """A command cut at the device's limit returns only what is under $OUT: first-look copies there after
    each of its commands (the log so far), and its time counts from the script's start, install included."""
    script = (BENCH_DIR / "gpu_suite.sh").read_text()
    body = script[script.index("first-look)  timeout"):script.index("tests)       timeout")]
    assert body.count("sync_out") == 2 and "with_what_is_left" in body  # + one in with_what_is_left itself
    assert "step_start=0" in script and 'STEP_TIMEOUT=$FIRST_LOOK_TIMEOUT' in script
    # the timeouts first-look passes: half of its time for the tests, the rest for the model bench
    rc, err, calls = run_gpu_suite(tmp_path, "first-look", first_look_timeout=100)
    assert rc == 0, err
    durations = []
    for line in (tmp_path / "timeouts.txt").read_text().splitlines():
        words = line.split()
        while words[0].startswith("-"):
            words = words[2:]
        durations.append(int(words[0]))
    assert len(durations) == 7 and 45 <= durations[0] <= 50  # the tests: half, from the start
    assert all(90 <= d <= 100 for d in durations[1:]), durations  # the rest: what is left of 100 s


class _SetDevice(BaseException):  # not an Exception: the command's own error handling lets it through
    pass


def test_a_bare_cuda_device_gets_an_index_before_set_device(monkeypatch):
    """--device cuda (or the default on a GPU machine): torch.cuda.set_device refuses a device without an
    index, so both the model bench and the kernel scripts resolve one first (checked on the CPU by catching
    the set_device call; a bare "cuda" there made every benchmark exit at once)."""
    calls = []

    def set_device(device):
        calls.append(device)
        raise _SetDevice

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(_SetDevice):
        cli.main([*TINY, "--device", "cuda", "--no-write"])
    with pytest.raises(_SetDevice):
        harness.run_kernel_benchmark([], harness.kernel_arg_parser("test").parse_args(["--device", "cuda"]))
    assert len(calls) == 2 and all(torch.device(d).type == "cuda" and torch.device(d).index is not None
                                   for d in calls)
