"""CUDA C++ sources of seqpar's GPU kernels, shipped as package data."""
