"""Compiler: PyTorch / MCUNet models -> int8 graph -> sparse training plan with a static memory plan."""
