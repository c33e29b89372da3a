"""The lab: the commands (``python -m sparsevid demo|eval|bench ...``), the trained testbed, the real-clip data,
attention statistics and pictures. It measures the library from the outside: it may import the library, the
library never imports it (docs/architecture.md)."""
