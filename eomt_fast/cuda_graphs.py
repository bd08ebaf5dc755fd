"""CUDA-graph execution of the model's forward: one graph captured per input shape, then replayed.

At batch 1 the network is launch bound (about 15 kernels a layer, 24 layers for EoMT-L): replaying a
captured graph launches all of them at once. ``model.enable_cuda_graphs()`` (or ``cuda_graphs=True`` on
``from_pretrained`` / ``from_hf``) routes ``model(pixel_values)`` through a ``CudaGraphs``; one can also
be called directly, ``CudaGraphs(model)(pixel_values)``, leaving ``model`` itself eager.

- A graph per key: the input shape, the model's device, dtype and backend, and its ``attn_mask_probs``
  (which layers compute a mask is decided on the host, so each setting is a graph of its own).
- First call of a key: a static input is allocated in the model's dtype and the caller's pixel_values are
  copied into it (cast on the way); the forward runs ``warmup`` times on a side stream (Triton compiles
  and autotunes there, the host caches of ``ops`` and ``masking_probs`` fill), then one forward is
  captured, with its own memory pool that holds the token buffer and every intermediate.
- Every call: copy the caller's pixel_values into the static input, replay, and return clones of the
  static outputs. ``clone_outputs=False`` returns the static outputs themselves (no copy; they are
  overwritten by the next call of the same key, so read or copy them first). The caller's pixel_values
  are only read.

Limits, each a clear error: the model must be on CUDA and its parameters must not require grad (inference
only, like the eager forward); pixel_values must not require grad; a ``generator`` cannot drive the random
unmasking of layers whose attn_mask_probs lies strictly between 0 and 1 (the graph draws from the default
CUDA generator, as captured graphs can). Under ``torch.compile`` the model bypasses these graphs (use
``mode="reduce-overhead"`` there). Moving or casting the model, or ``load_state_dict(..., assign=True)``,
drops its graphs (``model.weights_generation`` counts those changes; a runner made directly captures again
too); replacing a parameter object by hand is not detected (load new weights with ``load_state_dict``).
The graphs run on the model's device, made current for the call (it need not be the current one). Each
graph keeps its own memory pool until ``clear()``: a runner called at many batch sizes holds one pool each.

Calls from several threads take turns (a lock around copy, replay and clone; a call on another CUDA stream
waits on the GPU for the previous call's clones), so each gets its own input's outputs; with
``clone_outputs=False`` the returned buffers are shared by all of them.

``auto=True`` (what ``from_pretrained`` / ``from_hf`` give by default, ``cuda_graphs="auto"``): graphs where
they help and can run, the eager forward everywhere else. A call runs eager when the model is not on CUDA
(so one runner serves a model loaded on the CPU and moved later), while a CUDA graph is being captured on
the current stream (the caller's own capture: this forward's kernels become part of it), under a
``TorchDispatchMode`` (``FlopCounterMode`` and the like must see the ops), while some layer's
attn_mask_probs lies strictly between 0 and 1 (the warm-ups and the capture would draw from the default
CUDA generator, so a seeded run would no longer unmask the queries eager does), on the first call of a key
(a shape seen once, say the last smaller batch of a dataset, gets no graph and no memory pool), and for
new keys once ``max_graphs`` graphs are kept (default 4; without ``auto`` every shape is captured; nothing is
evicted, which would recapture on every call of a rotation of more shapes; ``clear()`` starts afresh).
The second call of a key captures it. Parameters or pixel_values that require grad are no obstacle there
(the forward runs under ``torch.no_grad`` either way), nor are hidden states or attentions asked for in
config.json (those calls run eager, as every call that asks for them). A capture that raises is an error
(PyTorch's capture leaves its stream and memory pool behind on failure, so nothing is retried in this
process for that key; load with ``cuda_graphs=False`` to run eager). Like ``True``, replacing a parameter
object by hand (``param.data = ...``, ``torch.func.functional_call``) is not seen: the graphs keep reading
the old tensors (``model.cuda_graphs.clear()``, or load new weights with ``load_state_dict``).

The capture is injectable (``capture=``): ``capture_eagerly`` runs the same buffer and key logic on any
device without a graph, for tests and debugging.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .kernels._triton import device_of

if TYPE_CHECKING:
    from .model import EomtFastForUniversalSegmentation, EomtFastOutput

Outputs = tuple[torch.Tensor, ...]
AUTO_MAX_GRAPHS = 4  # graphs an auto runner keeps (each holds a memory pool for its shape's activations)
_MAX_SEEN = 1024  # first-call keys an auto runner remembers
# given a function of the static input, returns (replay, its static outputs): what capturing a graph gives
Capture = Callable[[Callable[[], Outputs]], tuple[Callable[[], None], Outputs]]


def capture_cuda_graph(fn: Callable[[], Outputs], warmup: int = 2) -> tuple[Callable[[], None], Outputs]:
    """Run ``fn`` ``warmup`` times on a side stream (JIT compiles, autotuning and host caches stay out of
    the capture), then capture one call into a CUDA graph with a private memory pool. Returns the graph's
    replay and the outputs of the captured call, which every replay rewrites (nothing runs until then)."""
    # on the current device (CudaGraphs makes the model's current): the side stream, and the capture stream
    # passed explicitly (torch.cuda.graph's default one is created once, on whichever device came first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (their own work, allocations, syncs) during this capture are
    # theirs, not an error of this capture (CudaGraphs lets one of its own calls in at a time)
    with torch.cuda.graph(graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
        outputs = fn()
    return graph.replay, tuple(outputs)


def capture_eagerly(fn: Callable[[], Outputs]) -> tuple[Callable[[], None], Outputs]:
    """A stand-in for ``capture_cuda_graph`` on any device: 'replay' runs ``fn`` again (on the same static
    input) and writes its results into the outputs of the first run, as a graph replay rewrites its static
    outputs. For tests of the buffer and key logic, and for debugging."""
    outputs = tuple(fn())

    def replay() -> None:
        # the static outputs may be inference tensors (first call under torch.inference_mode)
        with torch.inference_mode(any(torch.is_inference(t) for t in outputs)):
            for static, new in zip(outputs, fn()):
                static.copy_(new)

    return replay, outputs


def _random_unmasking(probs: tuple[float, ...]) -> bool:
    """Whether some layer unmasks queries at random (an attn_mask_probs value strictly between 0 and 1)."""
    return any(0 < p < 1 for p in probs)


@dataclass
class _Graph:
    static_input: torch.Tensor
    outputs: Outputs
    replay: Callable[[], None]


class CudaGraphs:
    """``model``'s forward as CUDA graphs, one per input shape and masking setting (module docstring)."""

    def __init__(
        self,
        model: EomtFastForUniversalSegmentation,
        *,
        clone_outputs: bool = True,
        warmup: int = 2,
        capture: Capture | None = None,
        auto: bool = False,
        max_graphs: int | None = None,
    ) -> None:
        if max_graphs is not None and (isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1):
            raise ValueError(f"max_graphs must be a positive int or None, got {max_graphs!r}")
        if max_graphs is not None and not auto:
            raise ValueError("max_graphs needs auto=True (without it every shape is captured: a call past the limit "
                             "would have to run eager, which only auto does)")
        self.model = model
        self.clone_outputs = clone_outputs
        self.auto = auto
        self.max_graphs = (max_graphs or AUTO_MAX_GRAPHS) if auto else None
        self._capture: Capture = capture or functools.partial(capture_cuda_graph, warmup=warmup)
        self._needs_cuda = capture is None
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: set[tuple] = set()  # auto: the keys called before (a key's second call captures it)
        self._failed: set[tuple] = set()  # auto: the keys whose capture raised (they run eager after the error)
        self._weights_generation = model.weights_generation
        # one call at a time: a graph's static input and outputs are shared by every call of its key
        self._lock = threading.Lock()
        self._last_call: torch.cuda.Event | None = None  # the last call's copy-replay-clone, on its stream
        self._check_model()

    def _check_model(self) -> None:
        if self.auto:  # calls that cannot be captured run eager instead
            return
        model = self.model
        if self._needs_cuda and model.device.type != "cuda":
            raise RuntimeError(f"cuda_graphs=True needs the model on a CUDA device, it is on {model.device} "
                               "(load it with device='cuda', or leave cuda_graphs off)")
        grads = [name for name, p in model.named_parameters() if p.requires_grad]
        if grads:
            raise RuntimeError(f"cuda_graphs=True runs inference only, but parameters require grad: {grads[:3]}"
                               f"{' ...' if len(grads) > 3 else ''} (call model.requires_grad_(False))")

    def __len__(self) -> int:
        """The number of captured graphs."""
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every captured graph (and with it its memory pool and static buffers)."""
        self._graphs.clear()
        self._seen.clear()
        self._failed.clear()

    def describe(self) -> str:
        """One line: how ``model(...)`` runs with this runner (``eomt-fast info``)."""
        if self.auto:
            how = (f"CUDA graphs (auto): a shape's second call captures it, at most {self.max_graphs} shapes; eager "
                   "off CUDA, inside the caller's own capture or a dispatch mode, and while attn_mask_probs holds "
                   "values between 0 and 1")
        else:
            how = "CUDA graphs: every shape's first call captures it"
        return f"{how} ({len(self)} captured)"

    def __getstate__(self) -> dict:
        # pickled (torch.save of the model, a spawned worker) without its graphs, lock and event: the copy
        # captures its own graphs on its first calls
        state = self.__dict__.copy()
        state.update(_graphs={}, _seen=set(), _failed=set(), _lock=None, _last_call=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> CudaGraphs:
        # a copied model gets a runner of its own, with no graphs (they point into this model's memory)
        clone = copy.copy(self)
        clone.model = copy.deepcopy(self.model, memo)
        clone._graphs, clone._seen, clone._failed = {}, set(), set()
        clone._lock, clone._last_call = threading.Lock(), None
        return clone

    def key(self, pixel_values: torch.Tensor) -> tuple:
        """What a captured graph depends on: a call with another key captures another graph."""
        model = self.model
        return (tuple(pixel_values.shape), model.device, model.dtype, model.backend, model.masking_probs())

    @torch.no_grad()
    def __call__(
        self,
        pixel_values: torch.Tensor,
        patch_offsets: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> EomtFastOutput:
        """The model's forward replayed from the graph of this input's key: its outputs; pixel_values,
        patch_offsets (passed through) and generator as the model's forward takes them by keyword."""
        model = self.model
        if self.auto and not self._may_replay():
            return model._eager_output(pixel_values, patch_offsets, generator)
        model.check_pixel_values(pixel_values)
        if pixel_values.requires_grad and not self.auto:
            raise RuntimeError("cuda_graphs=True runs inference only: pixel_values requires grad "
                               "(pass pixel_values.detach())")
        if pixel_values.shape[0] == 0:
            return model._empty_output(patch_offsets)
        if self._needs_cuda and model.device.type != "cuda":
            raise RuntimeError(f"cuda_graphs=True needs the model on a CUDA device, it is on {model.device}")
        # Threads: one call at a time reads the key (masking_probs may sync), writes the static input, replays
        # and clones the outputs (the host part); a call on another CUDA stream than the last one first waits
        # for that one's clones on the GPU.
        with self._lock, device_of(pixel_values):  # the model's device (checked above): streams, capture, kernels
            if model.weights_generation != self._weights_generation:  # moved, cast or assigned since the captures:
                self.clear()  # their graphs read the old addresses
                self._weights_generation = model.weights_generation
            key = self.key(pixel_values)
            if generator is not None and _random_unmasking(key[-1]) and not self.auto:
                raise ValueError("generator= cannot drive the random unmasking (attn_mask_probs strictly between 0 "
                                 "and 1) of a captured CUDA graph, which draws from the default CUDA generator; "
                                 "call with generator=None, or disable cuda_graphs for this call")
            if self._last_call is not None:
                torch.cuda.current_stream().wait_event(self._last_call)
            outputs = None  # None: this call runs eager (below, outside the lock)
            graph = self._graphs.get(key)
            if graph is None and self.auto:
                if key not in self._seen or key in self._failed or self._full() or _random_unmasking(key[-1]):
                    self._remember(key)  # a first call, or one a graph does not serve: eager
                else:
                    graph = self._graphs[key] = self._record_auto(key, pixel_values)
            elif graph is None:
                graph = self._graphs[key] = self._record(pixel_values)  # the static input holds pixel_values
            else:
                graph.static_input.copy_(pixel_values)
            if graph is not None:
                graph.replay()
                outputs = tuple(t.clone() for t in graph.outputs) if self.clone_outputs else graph.outputs
                if self._needs_cuda:
                    self._last_call = torch.cuda.Event()
                    self._last_call.record()
        if outputs is None:
            return model._eager_output(pixel_values, patch_offsets, generator)
        return model._output(*outputs, patch_offsets)

    def _may_replay(self) -> bool:
        """auto: whether this call may go through a graph at all (else it runs eager)."""
        model = self.model
        if self._needs_cuda and model.device.type != "cuda":
            return False
        if torch._C._len_torch_dispatch_stack():
            return False  # a dispatch mode (FlopCounterMode, ...) must see the ops a replay would hide
        if model.device.type == "cuda":
            with device_of(model.patch_weight):  # the model's device, switched to only when it is not current
                if torch.cuda.is_current_stream_capturing():
                    return False  # the caller captures a graph of its own: this forward's kernels join it
        return not _random_unmasking(model.masking_probs())

    def _full(self) -> bool:
        return self.max_graphs is not None and len(self._graphs) >= self.max_graphs

    def _remember(self, key: tuple) -> None:
        if key not in self._seen and len(self._seen) >= _MAX_SEEN:  # many one-off shapes: forget them
            self._seen.clear()
        self._seen.add(key)

    def _record_auto(self, key: tuple, pixel_values: torch.Tensor) -> _Graph:
        """_record; a capture that raises is an error naming the way out, and its key is not tried again."""
        try:
            return self._record(pixel_values)
        except Exception as exc:
            self._failed.add(key)
            raise RuntimeError(f"eomt_fast: capturing a CUDA graph of the forward (cuda_graphs='auto', input shape "
                               f"{tuple(pixel_values.shape)}) failed: {type(exc).__name__}: {exc}. Load the model "
                               "with cuda_graphs=False to run it eager (PyTorch may leave the failed capture's "
                               "stream current and its memory pool allocated in this process)") from exc

    def _record(self, pixel_values: torch.Tensor) -> _Graph:
        model = self.model
        self._check_model()
        # a normal tensor even under torch.inference_mode: later calls copy into it in either mode
        with torch.inference_mode(False):
            static_input = torch.empty(pixel_values.shape, dtype=model.dtype, device=model.device)
        static_input.copy_(pixel_values)
        replay, outputs = self._capture(lambda: model._forward_tensors(static_input))
        return _Graph(static_input, tuple(outputs), replay)
