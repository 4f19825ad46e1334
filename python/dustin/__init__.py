# SPDX-License-Identifier: Apache-2.0
"""Dustin: draft-augmented sparse verification for long-context speculative decoding.

Importing the package loads the native extension, which registers ``torch.ops.dustin.*``.
"""

import torch  # noqa: F401  (the extension links against libtorch; load it first)

try:
    from dustin import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "dustin's native extension (dustin._C) is missing or failed to load: "
        f"{exc}. Build it from the repository root with "
        "`pip install --no-build-isolation -e .` (see README.md)."
    ) from exc

from dustin import ops

__all__ = ["built_with_cuda", "ops"]
__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """True when libdustin was built with its CUDA kernels."""
    return _C.built_with_cuda()
