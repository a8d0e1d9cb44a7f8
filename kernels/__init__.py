"""Triton faces of the wsss_fast ops (installed as ``wsss_fast.kernels``).

Each module pairs with ``wsss_fast.ops.<op>`` (validation, dispatch and the reference face live
there). On CPU tensors they run only under ``TRITON_INTERPRET=1`` (set before importing triton).
"""
