"""specgen: YAML specs of sparse-attention variants compiled into specialised, tested Triton kernels."""

__version__ = "0.1.0"
