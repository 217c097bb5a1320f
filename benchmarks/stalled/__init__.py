"""The stalled-readers benchmark (`python -m benchmarks.stalled_readers`), one job a module: the processes
(stack), the clients, the readings (sampling), the two phases, the figures drawn from them, the report and the
plot."""
