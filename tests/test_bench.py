"""The benchmark harness (bench/harness.py), `eomt-fast bench` and the kernel scripts, on the CPU.

Fast by construction: the tiny preset, no torch.compile, a fraction of a second of timing per row.
"""

import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from eomt_fast import bench, cli
from eomt_fast.bench import load_harness, preset_config

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


def test_timing_statistics():
    assert harness.percentile([3.0, 1.0, 2.0, 4.0, 5.0], 0.5) == 3.0
    assert harness.percentile([1.0, 2.0], 0.2) == pytest.approx(1.2)
    timing = harness.time_cpu(lambda: sum(range(1000)), budget_s=0.05, min_repeats=5)
    assert timing.samples >= 5 and 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert harness.rotation_count(1 << 20, 50 << 20) == 64  # small inputs: many copies, capped
    assert harness.rotation_count(10 << 20, 50 << 20) == 10  # 2x the cache in total
    assert harness.rotation_count(60 << 20, 50 << 20) == 1  # larger than the cache: no copies


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
           "bench_mask_logits": {"mask_logits", "grid_attention_mask"}, "bench_upscale": {"upscale"}}


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
