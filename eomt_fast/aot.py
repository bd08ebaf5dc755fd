"""Ahead-of-time compilation of the Triton kernels for real GPUs, without one (``eomt-fast check-kernels``).

Each kernel file in ``eomt_fast.kernels`` has ``aot_specs()``: the kernels at the configurations the
launcher uses on a GPU. Every spec is compiled for sm_80 (A100) and sm_90 (H100) with the ptxas that
ships in the triton wheel, and its cubin's resource usage is read with cuobjdump: registers, stack
(> 0 means register spills), shared memory, and on sm_90 whether the PTX uses wgmma. This checks that a
kernel compiles and how well; it says nothing about its speed.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .dispatch import KERNEL_MODULES  # the one list of kernel files
from .kernels._triton import LAUNCH_OPTIONS  # the options every launch passes

ARCHS = (80, 90)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one launch configuration, as the launcher would compile it on a GPU."""

    name: str
    fn: Any  # a triton.JITFunction
    signature: dict[str, str]  # argument -> "*bf16", "i32", "fp32", "constexpr", ...
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    needs_wgmma: bool = False  # on sm_90: the kernel's tl.dot must lower to wgmma
    needs_tma: bool = False  # on sm_90: its tensor-descriptor loads must lower to TMA copies
    min_arch: int = 0  # compiled for this architecture and later only (TMA tiles: the launcher uses them from sm_90)


@dataclass(frozen=True)
class CompileReport:
    name: str
    arch: int
    registers: int
    stack: int
    shared: int
    wgmma: bool
    needs_wgmma: bool
    tma: bool = False
    needs_tma: bool = False

    @property
    def ok(self) -> bool:
        return self.stack == 0 and (self.arch < 90 or ((not self.needs_wgmma or self.wgmma)
                                                       and (not self.needs_tma or self.tma)))

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        problems = []
        if self.stack:
            problems.append(f"spills ({self.stack} B stack)")
        if self.arch >= 90 and self.needs_wgmma and not self.wgmma:
            problems.append("no wgmma")
        if self.arch >= 90 and self.needs_tma and not self.tma:
            problems.append("no TMA")
        return (f"{self.name:<44} sm_{self.arch}  regs {self.registers:>3}  stack {self.stack:>4}  "
                f"smem {self.shared:>6}  wgmma {'yes' if self.wgmma else 'no ':<3}  tma {'yes' if self.tma else 'no ':<3}  "
                f"{verdict}"
                + (f" ({', '.join(problems)})" if problems else ""))


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: KernelSpec, arch: int) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                       **LAUNCH_OPTIONS})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"cannot read the resource usage of {spec.name}: {usage!r}")
    return CompileReport(
        name=spec.name,
        arch=arch,
        registers=int(match.group(1)),
        stack=int(match.group(2)),
        shared=int(compiled.metadata.shared),
        wgmma="wgmma.mma_async" in compiled.asm["ptx"],
        needs_wgmma=spec.needs_wgmma,
        tma="cp.async.bulk.tensor" in compiled.asm["ptx"],
        needs_tma=spec.needs_tma,
    )


def all_specs() -> list[KernelSpec]:
    specs = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"eomt_fast.kernels.{module_name}")
        specs.extend(module.aot_specs())
    return specs


def check_kernels(archs: tuple[int, ...] = ARCHS, name_filter: str | None = None) -> list[CompileReport]:
    return [compile_spec(spec, arch) for spec in all_specs()
            if name_filter is None or name_filter in spec.name for arch in archs if arch >= spec.min_arch]
