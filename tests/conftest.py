"""Test-session set-up that must happen before any test module imports triton.

Without CUDA the Triton kernels run through triton's interpreter, which triton chooses
when it is first imported and a kernel is defined; some libraries the tests import
(transformers, datasets) import triton themselves, so the choice is made here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
