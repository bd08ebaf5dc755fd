"""Triton, or a stand-in where it is not installed (macOS, Windows, CPU-only installs without it).

Kernel files import ``triton`` and ``tl`` from here. Without Triton the stand-in absorbs the module-level
uses (``@triton.jit``, ``triton.autotune(...)``, ``triton.Config(...)``, ``tl.constexpr`` annotations) so
that the plain-PyTorch references in the same files still import and run; calling a kernel then
raises an error that says Triton is missing. ``dispatch`` never picks a kernel when ``HAS_TRITON`` is False.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import TypeVar

import torch

# Options every kernel launch passes (and ``eomt-fast check-kernels`` compiles with): floating-point
# contraction (a * b + c as one FMA) stays on, as it is in Triton up to 3.9 and in PyTorch's own CUDA
# kernels. Triton 3.10 turns it off by default (3.9 warns that it will); the kernels were written and
# checked with it on. The interpreter ignores launch options.
LAUNCH_OPTIONS: dict = {"enable_fp_fusion": True}

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor  # host-side TMA descriptors (Triton >= 3.4)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/test_package.py in a subprocess
    HAS_TRITON = False

    class _Missing:
        """Any attribute, call or decoration of Triton: more of itself; a decorated function raises."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str) -> _Missing:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Missing(f"{self._name}.{attr}")

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _Missing):
                return _Missing(f"{self._name}({getattr(args[0], '__name__', 'kernel')})")
            if args and isinstance(args[0], _Missing) and len(args) == 1 and not kwargs:
                return args[0]
            if self._name.endswith(")"):
                raise RuntimeError(f"{self._name} needs Triton, which is not installed (pip install triton)")
            return _Missing(f"{self._name}(...)")

        def __getitem__(self, item) -> _Missing:
            return self

        def __repr__(self) -> str:
            return f"<missing triton: {self._name}>"

    triton = _Missing("triton")
    tl = _Missing("triton.language")
    TensorDescriptor = _Missing("triton.tools.tensor_descriptor.TensorDescriptor")


def triton_interpreting() -> bool:
    """Whether Triton's interpreter is on, read now and as Triton reads ``TRITON_INTERPRET`` ("1", "true",
    "on", "yes" in any case; "0", "false", "2" or unset: off). False without Triton."""
    return HAS_TRITON and bool(triton.knobs.runtime.interpret)


# As it was when this package was imported: ``@triton.jit`` decided then whether the kernels are compiled or
# interpreted, so launch-time choices (one autotune config, tile sizes) follow this value, not a later one.
INTERPRETING = triton_interpreting()

F = TypeVar("F", bound=Callable)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of positive ints, for launch grids on the host: ``triton.cdiv`` is a ConstexprFunction
    whose wrapper costs ~4 µs a call (Triton 3.6 and 3.9), and a forward computes ~330 grids."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as Triton's), on the host (``triton.next_power_of_2`` costs as
    cdiv does)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def aligned16(t: torch.Tensor, strides) -> bool:
    """t's data starts on 16 bytes and every given stride (in elements) is a multiple of 16 bytes: what a
    kernel's alignment hints (``tl.multiple_of`` on pointers and strides) may promise the compiler."""
    return t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in strides)


def device_of(tensor: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """The CUDA device of ``tensor`` made current for the block (a no-op off CUDA and when it already is).

    Triton launches on the *current* CUDA device and its current stream, whatever device the arguments
    are on; PyTorch's own ops follow their tensors. Without this, a model on cuda:1 used while cuda:0 is
    current would run its kernels on cuda:0 with cuda:1 pointers."""
    if not getattr(tensor, "is_cuda", False) or tensor.get_device() == torch.cuda.current_device():
        return contextlib.nullcontext()  # the common case, checked without building a torch.cuda.device
    return torch.cuda.device(tensor.device)


def on_input_device(launcher: F) -> F:
    """Decorates a host function that launches Triton kernels: they run on its first argument's device
    (see ``device_of``). ``tests/test_package.py`` checks that every launching function carries it."""
    first = next(iter(inspect.signature(launcher).parameters))

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        with device_of(args[0] if args else kwargs.get(first)):  # not a tensor: the launcher's checks say so
            return launcher(*args, **kwargs)

    return launch  # type: ignore[return-value]


def gpu_arch(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability of ``tensor``'s CUDA device (None off CUDA), which every autotuner factory
    (``_tuned_*(..., arch=)``) is cached on: Triton's Autotuner keys its cache on the key arguments and dtypes,
    never the device, so without it a tile tuned on an H100 (228 KiB of shared memory) would be reused,
    untimed, on a ~100 KiB GPU of another architecture in the same process and fail to launch there."""
    return _capability(tensor.get_device()) if tensor.is_cuda else None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # per launch otherwise: 13 µs under cProfile on the H200 host


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)  # active TorchDispatchModes (fake, ...)


def _plain_tensors(values) -> bool:
    """Every tensor among ``values`` is a plain torch.Tensor or nn.Parameter (no FakeTensor or other
    subclass) that autograd does not follow (grad mode off, or no requires_grad)."""
    grad = torch.is_grad_enabled()
    for v in values:
        if isinstance(v, torch.Tensor) and (type(v) not in _PLAIN or (grad and v.requires_grad)):
            return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_direct(op: Callable, mutated: str | None = None) -> Callable:
    """``op`` (a ``torch.library.custom_op``) for the model's forward: in eager mode on plain tensors, its
    Python body called directly, skipping the dispatcher's round trip (on an H200 an eager EoMT-L/640
    forward was host-bound, 22 ms against its CUDA graph's 4.6 ms; on this project's CPU machine calling the
    bodies took the Python around the launches from 15.2-16.0 to 11.5-12.1 ms a forward,
    ``bench/profile_host.py --stub-launches``);
    the op itself under torch.compile (tracing sees the opaque op and its fake), under a dispatch mode
    (FakeTensorMode, ...), for tensor subclasses and where autograd would record. ``mutated``: the argument
    the op writes (positional last, or by name), whose version counter is bumped as the op's would be.
    An op without a readable body (another torch) is returned as it is."""
    body = getattr(op, "_init_fn", None)
    if body is None or _dispatch_modes is None:
        return op

    def call(*args, **kwargs):
        if torch.compiler.is_compiling() or _dispatch_modes() or not (
                _plain_tensors(args) and _plain_tensors(kwargs.values())):
            return op(*args, **kwargs)
        result = body(*args, **kwargs)
        if mutated is not None:
            written = kwargs[mutated] if mutated in kwargs else args[-1]
            if not written.is_inference():
                torch.autograd.graph.increment_version(written)
        return result

    call.__name__ = call.__qualname__ = getattr(body, "__name__", "op")
    call.__doc__ = getattr(body, "__doc__", None)
    call.__wrapped__ = op
    return call


def check_devices(name: str, tensor: torch.Tensor, **others: torch.Tensor | None) -> None:
    """ValueError unless every tensor of ``others`` (None: absent) is on ``tensor``'s device. A kernel given a
    pointer to another GPU's memory would read it across the bus, or fault and lose the CUDA context."""
    for other_name, other in others.items():
        if other is not None and other.device != tensor.device:
            raise ValueError(f"{name} is on {tensor.device} but {other_name} on {other.device}")


__all__ = ["HAS_TRITON", "INTERPRETING", "LAUNCH_OPTIONS", "TensorDescriptor", "cdiv", "check_devices", "device_of", "eager_direct", "gpu_arch", "next_power_of_2", "on_input_device",
           "tl", "triton", "triton_interpreting"]
