"""specgate gateway: OpenAI-compatible streaming front for vLLM workers."""
