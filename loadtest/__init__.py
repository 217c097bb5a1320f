"""specgate load testing: load generator, fake engine and benchmarks."""
