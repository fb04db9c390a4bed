"""The optional C++/CUDA extension behind `copy_backend="native"` (sources in csrc/).

Built with `torch.utils.cpp_extension.load` on first use, and only when the
environment says `CWM_BUILD_EXT=1`: cwm installs and runs without it. The CUDA
kernel is compiled in when CUDA is available and nvcc is found (CUDA_HOME);
the CPU kernel (parallel memcpy) always is.
The op, `torch.ops.cwm_ext.copy_blocks`, takes the same tables and geometry as
the Triton kernel (see csrc/copy_blocks.cpp).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from cwm_connector.errors import ConfigError

BUILD_ENV = "CWM_BUILD_EXT"
CSRC = Path(__file__).resolve().parents[2] / "csrc"


def is_enabled() -> bool:
    """Whether the environment allows building the extension."""
    return os.environ.get(BUILD_ENV, "0") == "1"


def load(need_cuda: bool) -> Any:
    """The `copy_blocks` op, built on first use; ConfigError if it cannot serve CUDA tensors."""
    op, with_cuda = _build()
    if need_cuda and not with_cuda:
        raise ConfigError("copy_backend 'native' on CUDA needs nvcc (CUDA_HOME) to build csrc/")
    return op


@functools.cache
def _build() -> tuple[Any, bool]:
    # One build per process (its TORCH_LIBRARY can be registered once): with the CUDA
    # kernel whenever CUDA and nvcc are there; the CPU kernel is always in it.
    if not is_enabled():
        raise ConfigError(
            f"copy_backend 'native' needs the optional extension: set {BUILD_ENV}=1 "
            "(builds csrc/ with torch.utils.cpp_extension; needs a C++ compiler)"
        )
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = [CSRC / "copy_blocks.cpp"]
    if with_cuda:
        sources.append(CSRC / "copy_blocks_cuda.cu")
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise ConfigError(f"copy_backend 'native': sources not found: {missing} (needs a checkout)")
    try:
        cpp_extension.load(
            name="cwm_copy_ext_cuda" if with_cuda else "cwm_copy_ext_cpu",
            sources=[str(s) for s in sources],
            is_python_module=False,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            verbose=False,
        )
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"copy_backend 'native': building csrc/ failed: {exc}") from exc
    return torch.ops.cwm_ext.copy_blocks, with_cuda
