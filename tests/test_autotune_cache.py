"""The autotune cache (kernels/_autotune.py): a key benchmarked in one process is read back in the next.

Triton's real Autotuner.run drives it here, under the interpreter, with its benchmark replaced by fixed timings
(the interpreter has no GPU timer, and turns ``cache_results`` off: the tests turn it back on per tuner). "A new
process" is a new autotuner object with the record of the files this process wrote cleared: nothing but the
files under TRITON_CACHE_DIR carries over.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eomt_fast.kernels import _autotune, gemm as G
from eomt_fast.kernels._triton import HAS_TRITON, tl, triton

from tests.conftest import poison_

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


@triton.jit
def _scale_kernel(X, Out, N, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(X + offs, mask=offs < N) * factor, mask=offs < N)


def hook(nargs):  # a pre-hook, as the GEMM's TMA tiles have one
    nargs["hooked"] = True


CONFIGS = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1),
           triton.Config({"BLOCK": 64}, num_warps=1, pre_hook=hook)]


def new_tuner(timings_ms: dict[int, float], configs=CONFIGS):
    """A fresh autotuner (as a new process makes) whose benchmark of BLOCK b returns timings_ms[b] and is
    counted in ``tuner.benchmarked``."""
    _autotune._WRITTEN.clear()  # what a new process has not written
    tuner = _autotune.autotune(_scale_kernel, configs, ["N"])
    tuner.cache_results = True  # the interpreter turns Triton's flag off; the cache logic itself runs anyway
    tuner.benchmarked = []

    def bench(*args, config, **kwargs):
        tuner.benchmarked.append(config.kwargs["BLOCK"])
        t = timings_ms[config.kwargs["BLOCK"]]
        return [t, t * 0.5, t * 2]

    tuner._bench = bench
    return tuner


def launch(tuner, n: int = 100):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    out = poison_(torch.empty_like(x))
    tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n, 3.0)
    torch.testing.assert_close(out, x * 3.0)  # the chosen config really ran, on every element


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(_autotune.ENV, raising=False)
    return tmp_path


def cached_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.eomt_fast_autotune.json"))


def test_a_key_benchmarked_once_is_read_back_by_a_new_autotuner(cache_dir):
    first = new_tuner({16: 3.0, 32: 1.0, 64: 2.0})
    launch(first)
    assert first.benchmarked == [16, 32, 64] and first.best_config is CONFIGS[1] and first.from_disk is False
    (path,) = cached_files(cache_dir)
    data = json.loads(path.read_text())
    assert data["timings"] == [[3.0, 1.5, 6.0], [1.0, 0.5, 2.0], [2.0, 1.0, 4.0]]
    assert "BLOCK: 64" in data["configs"][2] and "hook" in data["configs"][2]

    # another process: other (wrong) timings would pick BLOCK 16, the file says 32 and nothing is benchmarked
    second = new_tuner({16: 0.1, 32: 9.0, 64: 9.0})
    before = dict(_autotune.TUNINGS)
    launch(second)
    assert second.benchmarked == [] and second.from_disk is True
    assert _autotune.TUNINGS["disk"] == before.get("disk", 0) + 1  # what profile_host.py reports
    assert _autotune.TUNINGS["benchmarked"] == before.get("benchmarked", 0)
    assert second.best_config is CONFIGS[1]
    assert second.configs_timings == {c: t for c, t in zip(CONFIGS, data["timings"])}
    # another key (N) is tuned on its own
    launch(second, n=40)
    assert second.benchmarked == [16, 32, 64] and second.best_config is CONFIGS[0]
    assert len(cached_files(cache_dir)) == 2


def test_each_choice_is_reported_once_per_key_with_where_its_times_came_from(cache_dir):
    launch(new_tuner({16: 3.0, 32: 1.0, 64: 2.0}), n=77)
    line = _autotune.tuned_configs()[-1]
    assert line.startswith("_scale_kernel N=77 -> BLOCK: 32,") and line.endswith("(1 ms, next best 2 ms; 3 configs timed)")
    launch(new_tuner({16: 0.1, 32: 9.0, 64: 9.0}), n=77)  # "another process": same winner, from disk
    assert _autotune.tuned_configs()[-1] == line.replace("timed)", "timed, by an earlier process: autotune cache)")
    assert sum("N=77 " in entry for entry in _autotune.tuned_configs()) == 1


def test_a_file_this_process_wrote_is_reused_but_not_called_an_earlier_process(cache_dir):
    first = new_tuner({16: 3.0, 32: 1.0, 64: 2.0})
    launch(first, n=55)
    before = dict(_autotune.TUNINGS)
    first.cache.clear()  # as gemm._tune does between launcher keys that share a Triton key
    launch(first, n=55)
    assert first.benchmarked == [16, 32, 64] and first.from_disk is False and first.best_config is CONFIGS[1]
    assert _autotune.TUNINGS["this process"] == before.get("this process", 0) + 1
    assert _autotune.TUNINGS["disk"] == before.get("disk", 0)


def test_autotuners_of_other_variants_do_not_share_files(cache_dir):
    """Two autotuners of one kernel with the same configs and key values, built for different launch flags
    (the GEMM's GLU, LN prologue, 4-D view: constexprs outside the key): each times its own."""
    plain = new_tuner({16: 3.0, 32: 1.0, 64: 2.0})
    launch(plain)
    other = new_tuner({16: 0.1, 32: 9.0, 64: 9.0})
    other.variant = ("glu",)
    launch(other)
    assert other.benchmarked == [16, 32, 64] and other.best_config is CONFIGS[0]
    assert len(cached_files(cache_dir)) == 2


def test_a_config_with_a_pre_hook_can_be_the_cached_winner(cache_dir):
    launch(new_tuner({16: 3.0, 32: 2.0, 64: 1.0}))
    second = new_tuner({16: 0.1, 32: 9.0, 64: 9.0})
    launch(second)
    assert second.benchmarked == [] and second.best_config is CONFIGS[2]  # the config object itself, hook and all


def test_other_configs_another_gpu_or_the_switch_off_benchmark_again(cache_dir, monkeypatch):
    launch(new_tuner({16: 3.0, 32: 1.0, 64: 2.0}))
    fewer = new_tuner({16: 3.0, 32: 1.0}, configs=CONFIGS[:2])  # the kernel's config list changed
    launch(fewer)
    assert fewer.benchmarked == [16, 32]

    monkeypatch.setattr(_autotune, "_device_identity", lambda: "another GPU sm90 132 SMs")
    other_gpu = new_tuner({16: 3.0, 32: 1.0, 64: 2.0})
    launch(other_gpu)
    assert other_gpu.benchmarked == [16, 32, 64]
    files = len(cached_files(cache_dir))

    for off in ("0", "off", "False"):
        monkeypatch.setenv(_autotune.ENV, off)
        assert not _autotune.cache_enabled()
        tuner = new_tuner({16: 3.0, 32: 1.0, 64: 2.0})
        launch(tuner)
        assert tuner.benchmarked == [16, 32, 64]
    assert len(cached_files(cache_dir)) == files  # nothing written with the switch off


def test_a_damaged_file_is_benchmarked_again_and_rewritten(cache_dir):
    launch(new_tuner({16: 3.0, 32: 1.0, 64: 2.0}))
    (path,) = cached_files(cache_dir)
    for damage in ("{not json", json.dumps({"format": 1, "timings": [[1.0]]}),
                   json.dumps({"format": 99, "timings": [[1.0], [2.0], [3.0]]}),
                   json.dumps({"format": 1, "timings": [[1.0], ["x"], [3.0]]})):
        path.write_text(damage)
        tuner = new_tuner({16: 3.0, 32: 1.0, 64: 2.0})
        launch(tuner)
        assert tuner.benchmarked == [16, 32, 64] and tuner.best_config is CONFIGS[1]
        assert json.loads(path.read_text())["timings"][1] == [1.0, 0.5, 2.0]


def test_a_cache_that_cannot_be_written_only_warns(cache_dir, monkeypatch):
    class ReadOnly:
        def get_file(self, name):
            return None

        def put(self, data, name, binary=True):
            raise PermissionError("read-only file system")

    monkeypatch.setattr(_autotune, "_cache_manager", lambda digest: ReadOnly())
    monkeypatch.setattr(_autotune, "_warned", set())
    tuner = new_tuner({16: 3.0, 32: 1.0, 64: 2.0})
    with pytest.warns(RuntimeWarning, match="could not write the autotune cache"):
        launch(tuner)
    assert tuner.best_config is CONFIGS[1]


def test_gemm_variants_are_chosen_from_the_cache_in_a_new_process(cache_dir, monkeypatch):
    """gemm._tune on a GPU with TMA (faked: sm_90): the pointer, TMA and persistent autotuners each benchmark two
    tiles and their medians pick the winner; in a new process (fresh autotuners and tile tables) the same
    winner comes from the files, with nothing benchmarked, and tuned_tiles says the times are an earlier
    process's. The launches are real (interpreter), so each call's result is checked."""
    base = G.INTERPRETER_CONFIG
    small, other = base, replace(base, group_m=base.group_m + 1)
    ms = {}  # (tma, persistent, GROUP_M) -> median ms of the benchmark

    def gemm_configs(glu=False, ln_prologue=False, fp32=False, view_4d=False, tma=False, persistent=False):
        return [replace(c, tma=tma, persistent=persistent) for c in (small, other)]

    benchmarked = []

    def tuned_kernel(*flags, restore_out=False, arch=None, tma=False, persistent=False):
        tuner = real_tuned_kernel(*flags, restore_out=restore_out, arch=arch, tma=tma, persistent=persistent)
        tuner.cache_results = True

        def bench(*args, config, **kwargs):
            benchmarked.append((tma, persistent))
            t = ms[tma, persistent, config.kwargs["GROUP_M"]]
            return [t, t, t]

        tuner._bench = bench
        return tuner

    real_tuned_kernel = G._tuned_kernel.__wrapped__  # a fresh autotuner per call: no state between "processes"
    monkeypatch.setattr(G, "gemm_configs", gemm_configs)
    monkeypatch.setattr(G, "_tuned_kernel", tuned_kernel)
    monkeypatch.setattr(G, "gpu_arch", lambda t: G.TMA_MIN_ARCH)
    gen = torch.Generator().manual_seed(5)
    a, w = torch.randn(70, 64, generator=gen).half(), (torch.randn(48, 64, generator=gen) * 0.125).half()
    expected = torch.nn.functional.linear(a.float(), w.float())
    lines = []
    for process, timings in enumerate(({(False, False): 1.0, (True, False): 0.5, (True, True): 0.7},
                                       {(False, False): 0.1, (True, False): 9.0, (True, True): 9.0})):
        for (tma, persistent), t in timings.items():  # the TMA tiles' second config (GROUP_M + 1) is the fastest
            ms[tma, persistent, base.group_m], ms[tma, persistent, base.group_m + 1] = t * 1.5, t
        _autotune._WRITTEN.clear()  # a new process
        monkeypatch.setattr(G, "_TILES", {})
        monkeypatch.setattr(G, "_VARIANT_TIMES", {})
        monkeypatch.setattr(G, "_LAUNCH_KWARGS", {})
        benchmarked.clear()
        for _ in range(2):
            out = poison_(torch.empty(70, 48, dtype=torch.float16))
            G.gemm(a, w, out=out)
            torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)
        (tile,) = G._TILES.values()
        assert tile.kwargs.get("TMA") and not tile.kwargs.get("PERSISTENT") and tile.kwargs["GROUP_M"] == base.group_m + 1
        assert len(benchmarked) == (6 if process == 0 else 0), benchmarked
        lines += G.tuned_tiles()
    assert lines[0].endswith("(pointer 1 ms, TMA 0.5 ms, persistent 0.7 ms)")
    assert lines[1].endswith("(pointer 1 ms, TMA 0.5 ms, persistent 0.7 ms, timed by an earlier process: "
                             "autotune cache)")


def test_the_switch_is_read_from_the_environment():
    code = "from eomt_fast.kernels import _autotune; print(_autotune.cache_enabled())"
    for value, expected in (("0", "False"), ("1", "True"), ("no", "False")):
        env = {**os.environ, _autotune.ENV: value}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert result.stdout.strip() == expected, result.stderr[-2000:]


def test_info_says_where_the_cache_is(cache_dir, monkeypatch):
    assert _autotune.describe_cache().startswith(f"on, in {cache_dir}")
    monkeypatch.setenv(_autotune.ENV, "off")
    assert _autotune.describe_cache().startswith(f"off ({_autotune.ENV}=off)")


GEMM_IN_A_PROCESS = """
import json, torch
from eomt_fast.kernels import _autotune, gemm as G
gen = torch.Generator(device="cuda").manual_seed(0)
a = torch.randn(1805, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.03
out = G.gemm(a, w)
ref = torch.nn.functional.linear(a.double(), w.double())
err = (out.double() - ref).abs().max().item()
print(json.dumps({"tunings": dict(_autotune.TUNINGS), "tiles": G.tuned_tiles(), "err": err}))
"""


@pytest.mark.gpu
def test_a_second_process_reads_the_gemm_tiles_on_a_gpu(tmp_path):
    """The real thing: Triton's benchmarks on the GPU in one process, none in the next (same tile chosen)."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop(_autotune.ENV, None)
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", GEMM_IN_A_PROCESS], capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["tunings"].get("benchmarked", 0) >= 1 and first["tunings"].get("disk", 0) == 0
    assert second["tunings"].get("benchmarked", 0) == 0 and second["tunings"].get("disk", 0) >= 1
    assert len(cached_files(tmp_path)) >= 1
    assert [t.split(" (")[0] for t in second["tiles"]] == [t.split(" (")[0] for t in first["tiles"]]
    assert all("autotune cache" in t for t in second["tiles"])
    assert max(first["err"], second["err"]) < 0.05  # bf16 output of K=1024 products of ~0.03-scaled values
