"""eomt_fast.cuda_graphs on the CPU: the key, static-buffer and output logic of CudaGraphs, with the capture
replaced by ``capture_eagerly`` (which re-runs the captured function on the static input and writes into the
first run's outputs, as a graph replay does). The real capture and replay run in tests/test_model_gpu.py."""

import copy

import pytest
import torch

from eomt_fast import EomtFastConfig, EomtFastForUniversalSegmentation
from eomt_fast.cuda_graphs import CudaGraphs, capture_eagerly
from eomt_fast.testing import TEST_CONFIGS

OUTPUTS = ("class_queries_logits", "masks_queries_logits", "last_hidden_state")


class CountingCapture:
    """capture_eagerly, counting the captures and the replays."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def __call__(self, fn):
        self.captures += 1
        replay, outputs = capture_eagerly(fn)

        def counted() -> None:
            self.replays += 1
            replay()

        return counted, outputs


def small_model(probs=(1.0, 0.0), dtype=torch.float32) -> EomtFastForUniversalSegmentation:
    config = EomtFastConfig.from_dict(dict(TEST_CONFIGS["small_r4"], model_type="eomt"))
    torch.manual_seed(0)
    model = EomtFastForUniversalSegmentation(config, backend="torch").to(dtype)
    model.attn_mask_probs.copy_(torch.tensor(probs))
    return model


def pixels(batch: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_same_outputs(got, expected) -> None:
    for name in OUTPUTS:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_replays_equal_eager_and_one_capture_per_key():
    model = small_model()
    capture = CountingCapture()
    graphs = CudaGraphs(model, capture=capture)
    x1, x2, x3 = pixels(2, 1), pixels(2, 2), pixels(1, 3)
    for x in (x1, x2, x1, x3):
        assert_same_outputs(graphs(x), model(x))  # model itself stays eager
    assert capture.captures == 2 and len(graphs) == 2  # batch 2 and batch 1
    assert capture.replays == 4
    model.attn_mask_probs.fill_(0.0)  # another masking setting: another graph
    assert_same_outputs(graphs(x1), model(x1))
    assert capture.captures == 3


def test_calls_from_threads_take_turns():
    """Two threads on one runner: each gets its own input's outputs. The replay is slowed down so that without
    the lock the second thread's input copy lands in the static input while the first replays."""
    import threading
    import time

    model = small_model()

    def slow_capture(fn):
        replay, outputs = capture_eagerly(fn)

        def slow_replay() -> None:
            time.sleep(0.2)
            replay()

        return slow_replay, outputs

    graphs = CudaGraphs(model, capture=slow_capture)
    inputs = [pixels(2, 10 + i) for i in range(3)]
    graphs(inputs[0])  # captured: later calls replay
    results: dict[int, object] = {}

    def call(i: int) -> None:
        results[i] = graphs(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # each starts while the one before is inside its replay
    for t in threads:
        t.join()
    for i, x in enumerate(inputs):
        assert_same_outputs(results[i], model(x))


def test_a_model_with_graphs_pickles_without_them():
    """torch.save of the model, or a spawned worker: the runner goes along without its graphs (nor its lock),
    and the copy captures its own."""
    import pickle

    model = small_model()
    model.enable_cuda_graphs(capture=capture_eagerly)
    x = pixels(2, 5)
    expected = model(x)
    assert len(model.cuda_graphs) == 1
    copy_ = pickle.loads(pickle.dumps(model))
    assert len(copy_.cuda_graphs) == 0 and copy_.cuda_graphs.model is copy_
    assert_same_outputs(copy_(x), expected)
    assert len(copy_.cuda_graphs) == 1 and len(model.cuda_graphs) == 1


def test_outputs_are_clones_that_later_calls_leave_alone():
    model = small_model()
    graphs = CudaGraphs(model, capture=capture_eagerly)
    first = graphs(pixels(2, 1))
    kept = {name: getattr(first, name).clone() for name in OUTPUTS}
    second = graphs(pixels(2, 2))
    for name in OUTPUTS:
        assert torch.equal(getattr(first, name), kept[name]), f"{name} changed under the caller"
        assert not torch.equal(getattr(second, name), kept[name])


def test_clone_outputs_false_returns_the_static_outputs():
    """The documented no-copy option: the same tensors every call of a key, rewritten by the next call."""
    model = small_model()
    graphs = CudaGraphs(model, clone_outputs=False, capture=capture_eagerly)
    first = graphs(pixels(2, 1))
    second = graphs(pixels(2, 2))
    for name in OUTPUTS:
        assert getattr(first, name) is getattr(second, name)
    assert_same_outputs(second, model(pixels(2, 2)))


def test_the_callers_pixel_values_are_read_only_and_cast_into_the_static_input():
    model = small_model(dtype=torch.float64)
    graphs = CudaGraphs(model, capture=capture_eagerly)
    x = pixels(2, 4)[:, :, :, :]  # float32, cast on the copy into the float64 static input
    strided = torch.randn(2, 3, 64, 128)[..., ::2]  # not contiguous
    strided.copy_(x)
    before = strided.clone()
    got = graphs(strided)
    assert torch.equal(strided, before)
    assert got.masks_queries_logits.dtype == torch.float64
    assert_same_outputs(got, model(x.double()))


def test_forward_goes_through_the_graphs_when_enabled_and_patch_offsets_pass_through():
    model = small_model()
    x = pixels(2, 5)
    expected = model(x)
    capture = CountingCapture()
    model.enable_cuda_graphs(capture=capture)
    offsets = [torch.tensor([0, 64, 0, 64])]
    got = model(x, patch_offsets=offsets)
    assert_same_outputs(got, expected)
    assert got.patch_offsets is offsets and capture.captures == 1
    assert model(pixels(0, 0)).masks_queries_logits.shape[0] == 0 and capture.captures == 1  # batch 0: no graph
    model.disable_cuda_graphs()
    assert model.cuda_graphs is None
    assert_same_outputs(model(x), expected)


def test_moving_or_casting_the_model_drops_its_graphs():
    model = small_model()
    model.enable_cuda_graphs(capture=capture_eagerly)
    model(pixels(1, 6))
    assert len(model.cuda_graphs) == 1
    model.double()
    assert len(model.cuda_graphs) == 0
    assert_same_outputs(model(pixels(1, 6).double()), small_model(dtype=torch.float64)(pixels(1, 6).double()))


def test_deepcopy_gives_the_copy_its_own_empty_runner():
    model = small_model()
    model.enable_cuda_graphs(capture=capture_eagerly)
    model(pixels(1, 7))
    clone = copy.deepcopy(model)
    assert clone.cuda_graphs is not model.cuda_graphs and clone.cuda_graphs.model is clone
    assert len(clone.cuda_graphs) == 0 and len(model.cuda_graphs) == 1
    assert_same_outputs(clone(pixels(1, 7)), model(pixels(1, 7)))


def test_compiled_model_bypasses_the_graphs():
    """Under torch.compile the forward runs the network itself (use mode='reduce-overhead' for graphs there)."""
    model = small_model()
    capture = CountingCapture()
    model.enable_cuda_graphs(capture=capture)
    x = pixels(2, 8)
    expected = model(x)  # through the graphs (and it resolves the ops, as a compiled forward needs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x).masks_queries_logits, expected.masks_queries_logits, rtol=1e-5, atol=1e-5)
    assert capture.captures == 1 and capture.replays == 1  # the eager call only


def test_clear_errors():
    model = small_model()
    with pytest.raises(RuntimeError, match="CUDA device"):
        model.enable_cuda_graphs()  # the real capture on a CPU model
    graphs = CudaGraphs(model, capture=capture_eagerly)
    with pytest.raises(RuntimeError, match="requires grad"):
        graphs(pixels(1, 1).requires_grad_())
    model.attn_mask_probs.copy_(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="generator"):
        graphs(pixels(1, 1), generator=torch.Generator().manual_seed(0))
    graphs(pixels(1, 1))  # fractional probs with the default generator are fine
    with pytest.raises(ValueError, match="expects 64x64"):
        graphs(torch.randn(1, 3, 32, 32))
    model.query.requires_grad_(True)
    with pytest.raises(RuntimeError, match="parameters require grad"):
        CudaGraphs(model, capture=capture_eagerly)


def test_from_pretrained_with_cuda_graphs_on_a_cpu_device_is_an_error(tmp_path):
    small_model().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="needs the model on a CUDA device, it is on cpu"):
        EomtFastForUniversalSegmentation.from_pretrained(tmp_path, cuda_graphs=True)
    assert EomtFastForUniversalSegmentation.from_pretrained(tmp_path, cuda_graphs=False).cuda_graphs is None
    for bad in ("yes", 1, None, "on"):
        with pytest.raises(ValueError, match="cuda_graphs must be 'auto', True or False, got"):
            EomtFastForUniversalSegmentation.from_pretrained(tmp_path, cuda_graphs=bad)


def test_loaders_default_to_auto_which_runs_eager_off_cuda(tmp_path):
    """The default, cuda_graphs="auto", on a CPU model: a runner that leaves every call to the eager forward
    (the real capture, never attempted: no error, no graph), with outputs equal to a model loaded without it.
    It stays with the model, so after a move to CUDA the same model would replay graphs."""
    small_model(probs=(0.5, 1.0)).save_pretrained(tmp_path)
    model = EomtFastForUniversalSegmentation.from_pretrained(tmp_path)
    plain = EomtFastForUniversalSegmentation.from_pretrained(tmp_path, cuda_graphs=False)
    assert model.cuda_graphs is not None and model.cuda_graphs.auto and plain.cuda_graphs is None
    assert model.cuda_graphs.describe().startswith("CUDA graphs (auto)")
    x = pixels(2, 4)
    for seed in (1, 1, 2):
        got = model(x, generator=torch.Generator().manual_seed(seed))  # random unmasking: fine, eager
        assert_same_outputs(got, plain(x, generator=torch.Generator().manual_seed(seed)))
    assert len(model.cuda_graphs) == 0
    model.query.requires_grad_(True)  # no refusal either: the forward runs under no_grad all the same
    gen = torch.Generator().manual_seed
    assert_same_outputs(model(x.clone().requires_grad_(), generator=gen(5)), plain(x, generator=gen(5)))


def test_auto_captures_a_shape_on_its_second_call_and_replays_after():
    model = small_model()
    x1, x2, x3, y = pixels(2, 1), pixels(2, 2), pixels(2, 3), pixels(1, 4)
    expected = {id(x): model(x) for x in (x1, x2, x3, y)}  # eager: the model has no runner yet
    capture = CountingCapture()
    model.enable_cuda_graphs(capture=capture, auto=True)
    for x, captures, replays in ((x1, 0, 0), (y, 0, 0), (x2, 1, 1), (x3, 1, 2), (x1, 1, 3), (y, 2, 4)):
        assert_same_outputs(model(x), expected[id(x)])
        assert (capture.captures, capture.replays) == (captures, replays)
    assert len(model.cuda_graphs) == 2


def test_auto_runs_eager_where_a_graph_does_not_serve_and_raises_none_of_trues_errors():
    """While attn_mask_probs unmasks at random, auto runs eager (with or without generator=: the warm-ups and
    the capture would draw from the default generator, and a seeded run would unmask other queries than eager
    does), where cuda_graphs=True raises for generator=; config.json asking for hidden states is no error
    (those calls run eager)."""
    model = small_model(probs=(0.5, 1.0))
    model.config.extra["output_hidden_states"] = True
    try:
        capture = CountingCapture()
        model.enable_cuda_graphs(capture=capture, auto=True)
        x = pixels(1, 5)
        outs = [model(x, generator=torch.Generator().manual_seed(3)) for _ in range(3)]
        assert capture.captures == 0 and len(outs[0].hidden_states) > 0
        for out in outs[1:]:
            assert_same_outputs(out, outs[0])  # the same seed each time: the same random unmasking
        model.config.extra["output_hidden_states"] = False
        torch.manual_seed(4)
        first = [model(x) for _ in range(3)]
        torch.manual_seed(4)
        model.disable_cuda_graphs()
        assert all(torch.equal(a.masks_queries_logits, model(x).masks_queries_logits) for a in first)
        model.enable_cuda_graphs(capture=capture, auto=True)
        model.attn_mask_probs.copy_(torch.tensor([1.0, 0.0]))
        model(x), model(x)
        assert capture.captures == 1  # no random unmasking: the second plain call captures
    finally:
        model.config.extra.pop("output_hidden_states")


def test_auto_gives_graphs_to_max_graphs_shapes_then_runs_new_ones_eager():
    """No eviction: a rotation of more shapes than max_graphs would otherwise capture again on every call."""
    model = small_model()
    capture = CountingCapture()
    model.enable_cuda_graphs(capture=capture, auto=True, max_graphs=2)
    a, b, c = pixels(1, 1), pixels(2, 2), pixels(3, 3)
    for _ in range(3):
        for x in (a, b, c):
            assert_same_outputs(model(x), model._eager_output(x, None, None))
    assert capture.captures == 2 and capture.replays == 4 and len(model.cuda_graphs) == 2  # a and b, twice each
    model.cuda_graphs.clear()
    model(c), model(c)
    assert capture.captures == 3
    with pytest.raises(ValueError, match="max_graphs must be a positive int or None"):
        CudaGraphs(model, capture=capture_eagerly, auto=True, max_graphs=0)
    with pytest.raises(ValueError, match="max_graphs needs auto=True"):
        CudaGraphs(model, capture=capture_eagerly, max_graphs=2)


def test_auto_runs_eager_under_a_dispatch_mode_and_in_shallow_copies():
    """FlopCounterMode (a TorchDispatchMode) must see the ops, which a replay hides; a shallow copy of the model
    (nn.DataParallel's replicas: each on its own device, sharing the original's runner) runs eager."""
    from torch.utils.flop_counter import FlopCounterMode

    model = small_model()
    capture = CountingCapture()
    model.enable_cuda_graphs(capture=capture, auto=True)
    x = pixels(1, 8)
    model(x)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert capture.captures == 0 and counter.get_total_flops() > 0
    replica = copy.copy(model)  # what _replicate_for_data_parallel starts from: the same __dict__ entries
    assert replica.cuda_graphs is model.cuda_graphs
    replica(x), replica(x)
    assert capture.captures == 0
    model(x)
    assert capture.captures == 1


def test_a_failed_auto_capture_is_an_error_and_that_shape_runs_eager_after():
    model = small_model()
    attempts = []

    def failing_capture(fn):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    model.enable_cuda_graphs(capture=failing_capture, auto=True)
    x = pixels(1, 6)
    expected = model._eager_output(x, None, None)
    assert_same_outputs(model(x), expected)  # first call: eager, no capture tried
    with pytest.raises(RuntimeError, match=r"capturing a CUDA graph of the forward \(cuda_graphs='auto', input shape "
                                           r"\(1, 3, 64, 64\)\) failed: RuntimeError: operation not permitted.*"
                                           r"cuda_graphs=False"):
        model(x)
    assert_same_outputs(model(x), expected)  # not tried again
    assert len(attempts) == 1 and len(model.cuda_graphs) == 0


def test_auto_runner_copies_and_pickles_without_its_history():
    import io

    model = small_model()
    capture = CountingCapture()
    model.enable_cuda_graphs(capture=capture, auto=True)
    x = pixels(1, 7)
    model(x), model(x)
    clone = copy.deepcopy(model)
    assert clone.cuda_graphs.auto and len(clone.cuda_graphs) == 0
    clone(x)
    assert capture.captures == 1  # the copy's first call of x is eager again: its own history
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.cuda_graphs.auto and len(loaded.cuda_graphs) == 0 and not loaded.cuda_graphs._seen


def test_calls_inside_and_outside_inference_mode_share_the_graph():
    """A graph captured under torch.inference_mode (the benchmark) replays outside it and vice versa."""
    model = small_model()
    capture = CountingCapture()
    graphs = CudaGraphs(model, capture=capture)
    with torch.inference_mode():
        first = graphs(pixels(1, 1))
    second = graphs(pixels(1, 2))
    with torch.inference_mode():
        third = graphs(pixels(1, 1))
    assert capture.captures == 1 and capture.replays == 3
    assert_same_outputs(first, third)
    assert_same_outputs(second, model(pixels(1, 2)))


def test_hidden_states_or_attentions_run_the_forward_uncaptured():
    model = small_model()
    x = pixels(2, 9)
    expected = model(x, output_hidden_states=True, output_attentions=True)
    capture = CountingCapture()
    model.enable_cuda_graphs(capture=capture)
    got = model(x, output_hidden_states=True, output_attentions=True)
    assert capture.captures == 0 and capture.replays == 0  # the graphs hold neither output
    assert_same_outputs(got, expected)
    for a, b in zip(got.hidden_states + got.attentions, expected.hidden_states + expected.attentions):
        assert torch.equal(a, b)
    model(x)
    assert capture.captures == 1  # a plain call still goes through the graphs
    model.disable_cuda_graphs()


def test_config_level_hidden_states_are_an_error_with_graphs():
    """config.json asking for hidden states would make every call run uncaptured: refused, not silent."""
    model = small_model()
    model.config.extra["output_hidden_states"] = True
    try:
        with pytest.raises(ValueError, match=r"config \(its config.json\) sets output_hidden_states=True, which CUDA graphs do not capture"):
            model.enable_cuda_graphs(capture=capture_eagerly)
        assert model.cuda_graphs is None
        model.config.extra["output_hidden_states"] = False
        model.enable_cuda_graphs(capture=capture_eagerly)
        assert model(pixels(1, 1)).hidden_states is None
    finally:
        model.config.extra.pop("output_hidden_states")
        model.disable_cuda_graphs()


def test_a_direct_runner_captures_again_after_the_weights_move():
    """A CudaGraphs made directly (not the model's own runner, which _apply clears) must not replay graphs
    that read the old weight addresses: casting there and back, or load_state_dict(assign=True), gives the
    same key but new tensors. A plain load_state_dict copies in place: the graphs stay valid."""
    model = small_model()
    capture = CountingCapture()
    graphs = CudaGraphs(model, capture=capture)
    x = pixels(1, 11)
    graphs(x)
    generation = model.weights_generation
    model.double().float()
    assert model.weights_generation > generation
    assert_same_outputs(graphs(x), model(x))
    assert capture.captures == 2 and len(graphs) == 1  # the stale graph dropped, not kept beside the new one
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # copies in place
    graphs(x)
    assert capture.captures == 2
    state["norm_weight"] += 1.0
    model.load_state_dict(state, assign=True)  # new tensors
    assert model.norm_weight.data_ptr() == state["norm_weight"].data_ptr()
    assert_same_outputs(graphs(x), model(x))
    assert capture.captures == 3
