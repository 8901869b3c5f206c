"""Triton attention kernels and their plain-torch references (installed as minivllm.kernels)."""
