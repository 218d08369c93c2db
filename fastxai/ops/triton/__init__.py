"""Triton kernels of the fused ops, one module per op (same file stem as ``csrc/cpu/<op>.cpp``).

Each module defines ``torch.library.custom_op("fastxai::<op>_triton")`` wrappers with fake and
autograd registrations. Import them only when the Triton backend is used: ``TRITON_INTERPRET=1``
must be set before the first ``@triton.jit`` kernel is defined when no GPU is present.
"""
