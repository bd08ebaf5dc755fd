"""kernels._triton.eager_direct: a custom op's body called directly in eager mode, the op itself otherwise."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from eomt_fast.kernels._triton import cdiv, eager_direct, next_power_of_2

calls = {"body": 0, "dispatched": 0}


@torch.library.custom_op("eomt_fast_test::scaled", mutates_args=())
def scaled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    calls["body"] += 1
    return x * w


@scaled.register_fake
def _(x, w):
    return torch.empty_like(x)


@scaled.register_kernel("cpu")
def _(x, w):  # what the dispatcher runs on a CPU tensor: tells the two paths apart
    calls["dispatched"] += 1
    return x * w


@torch.library.custom_op("eomt_fast_test::scaled_into", mutates_args=("out",))
def scaled_into(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x * w)


def counted(fn):
    calls.update(body=0, dispatched=0)
    result = fn()
    return result, (calls["body"], calls["dispatched"])


def test_eager_calls_the_body_and_gives_the_op_result():
    direct = eager_direct(scaled)
    x, w = torch.randn(5, 3), torch.nn.Parameter(torch.randn(3), requires_grad=False)
    expected, path = counted(lambda: scaled(x, w))
    assert path == (0, 1)
    with torch.no_grad():
        got, path = counted(lambda: direct(x, w))
    assert path == (1, 0) and torch.equal(got, expected)
    with torch.inference_mode():
        _, path = counted(lambda: direct(x, w))
    assert path == (1, 0)


def test_autograd_fake_tensors_and_subclasses_get_the_op():
    direct = eager_direct(scaled)
    x, w = torch.randn(5, 3), torch.randn(3, requires_grad=True)
    _, path = counted(lambda: direct(x, w))  # grad mode on and a tensor that requires grad
    assert path == (0, 1)
    with torch.no_grad():
        _, path = counted(lambda: direct(x, w))  # grad mode off: nothing to record
    assert path == (1, 0)
    mode = FakeTensorMode()
    fake_x, fake_w = mode.from_tensor(x), mode.from_tensor(w.detach())
    with mode:
        fake, path = counted(lambda: direct(fake_x, fake_w))
    assert path == (0, 0) and type(fake).__name__ == "FakeTensor" and fake.shape == (5, 3)  # the fake ran

    class Sub(torch.Tensor):
        pass

    with torch.no_grad():
        _, path = counted(lambda: direct(x.as_subclass(Sub), w))
    assert path == (0, 1)


def test_torch_compile_traces_the_op():
    direct = eager_direct(scaled)
    x, w = torch.randn(5, 3), torch.randn(3)
    compiled = torch.compile(lambda a, b: direct(a, b) + 1, backend="eager", fullgraph=True)
    with torch.no_grad():
        got, path = counted(lambda: compiled(x, w))
    assert path == (0, 1) and torch.allclose(got, x * w + 1)


@pytest.mark.parametrize("by_name", [False, True])
def test_the_written_argument_gets_a_new_version(by_name):
    direct = eager_direct(scaled_into, mutated="out")
    x, w, out = torch.randn(4), torch.randn(4), torch.full((4,), float("nan"))
    before = out._version
    with torch.no_grad():
        direct(x, w, out=out) if by_name else direct(x, w, out)
    assert out._version > before and torch.equal(out, x * w)
    with torch.inference_mode():
        inference_out = torch.empty(4)
        direct(x, w, inference_out)  # an inference tensor has no version counter to bump
    assert torch.equal(inference_out, x * w)


def test_an_op_without_a_readable_body_is_returned_as_it_is():
    def plain(x):
        return x

    assert eager_direct(plain) is plain


def test_host_grid_helpers_match_triton():
    triton = pytest.importorskip("triton")
    for a in range(0, 600):
        assert next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 3, 16, 64, 128):
            if a:
                assert cdiv(a, b) == triton.cdiv(a, b)
