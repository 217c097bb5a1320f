"""specgate engine: vLLM worker profiles, launch, supervision and demo models."""
