"""GEMM building blocks shared by the fused ops (projection GEMMs with epilogues).

Holds no plain-PyTorch op of its own: every op built from these blocks has its reference in the file
of that op (``linear.py``, ``layernorm_mlp.py``, ``upscale.py``, ...).
"""
