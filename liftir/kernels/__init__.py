"""Heavy linear kernels the interpreter's rules call, each picking onnxruntime or the array module."""
from liftir.kernels.conv import conv, conv_adjoint, conv_transpose, conv_transpose_adjoint, resolve_auto_pad

__all__ = ["conv", "conv_adjoint", "conv_transpose", "conv_transpose_adjoint", "resolve_auto_pad"]
