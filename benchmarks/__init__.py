"""specgate's benchmarks (not installed): the side-by-side gateway comparison, direct vs gateway on vLLM, routing,
speculation and the vLLM-bench cross-check; run them from the repository root as `python -m benchmarks.<name>`."""
