"""Fused operators of eomt_fast, each with its plain-PyTorch reference beside it.

This directory is installed as ``eomt_fast.kernels`` (see ``package-dir`` in pyproject.toml). It must
never be importable as a top-level ``kernels`` module: that name belongs to the Hugging Face
``kernels`` package, which ``transformers`` imports when it is installed.

One file per fused op; each file starts with its ``*_ref`` function, the plain-PyTorch implementation
that is both the CPU fallback of the model and the reference its Triton kernel is tested against.
"""

if __name__ != "eomt_fast.kernels":
    # Imported as a top-level `kernels`: Python put a checkout's root on sys.path (`python -m ...` or
    # `python -c ...` run from the root), and transformers imports the Hugging Face `kernels` package
    # (a dependency of transformers since 5.25) by that name. When that package is installed it takes this
    # module's place: it is looked up on sys.path without the checkout's root, executed, and put in
    # sys.modules, which is what `import kernels` then returns. Without it this module stays an empty stray
    # directory with no version and no file, which transformers reports as "kernels not available".
    # Raising here would crash `import transformers`. None of eomt_fast's code is reachable under this name.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _search = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _real = _machinery.PathFinder.find_spec(__name__, _search)
    if _real is not None and _real.loader is not None:
        _module = _util.module_from_spec(_real)
        _sys.modules[__name__] = _module
        _real.loader.exec_module(_module)
    else:
        __file__ = None
        __path__ = []
        __all__ = []
else:
    from .attention import attention_ref, expand_query_patch_mask
    from .layernorm_mlp import layernorm_mlp_ref, layernorm_swiglu_ref
    from .linear import gelu_ref, layernorm_linear_ref, linear_residual_ref, mask_head_ref
    from .mask_logits import grid_attention_mask_ref, mask_logits_ref
    from .patch_embed import patch_embed_ref
    from .rope import rope_ref, rope_tables_ref
    from .upscale import upscale_block_ref

    __all__ = [
        "attention_ref",
        "expand_query_patch_mask",
        "gelu_ref",
        "grid_attention_mask_ref",
        "layernorm_linear_ref",
        "layernorm_mlp_ref",
        "layernorm_swiglu_ref",
        "linear_residual_ref",
        "mask_head_ref",
        "mask_logits_ref",
        "patch_embed_ref",
        "rope_ref",
        "rope_tables_ref",
        "upscale_block_ref",
    ]
