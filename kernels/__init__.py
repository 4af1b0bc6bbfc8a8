"""Triton kernels, shipped as pyoptim.kernels. Importing this package imports no Triton."""
