"""Layer kernels: the pure-PyTorch reference, the numba CPU kernels, and the one dispatch point (``ops``)."""
