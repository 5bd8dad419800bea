"""Where a compiled pass runs: onnxruntime's CPU provider on NumPy arrays, or its CUDA
provider on CuPy arrays through IO binding.

Why IO binding: `InferenceSession.run` takes and returns host arrays, so a pass on the GPU
would copy every input to the device and every output back. Bound to the arrays' device
pointers, the inputs are read where they lie and the outputs are written into arrays the
caller's array module allocated on the same device: no host round trip, and the results
are CuPy arrays the rest of liftir (which runs on `xp`) reads as they are.
"""
from __future__ import annotations

import numpy as np

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def providers() -> list[str]:
    import onnxruntime as ort
    return list(ort.get_available_providers())


def device_of(xp) -> str:
    """onnxruntime's name of the device `xp` allocates on: "cuda" for CuPy; "cpu" for NumPy
    and for host array modules (the tests' NumPy stand-in that is not NumPy)."""
    return "cuda" if getattr(xp, "__name__", "") == "cupy" else "cpu"


def why_not_on(xp) -> str | None:
    """Why a compiled pass cannot run on the device of array module `xp` (None: it can)."""
    if device_of(xp) == "cpu":
        return None
    if CUDA not in providers():
        return ("the array backend is CuPy and this onnxruntime has no CUDA provider (install "
                "onnxruntime-gpu in place of onnxruntime: see the README, GPU)")
    return None


def providers_for(xp) -> list[str]:
    """onnxruntime providers for a pass on `xp`'s device, CPU last for any op without a
    kernel there (onnxruntime then copies around that node itself)."""
    return [CPU] if device_of(xp) == "cpu" else [CUDA, CPU]


def require_providers(session, xp) -> None:
    """Refuse a GPU session that onnxruntime quietly opened on the CPU: onnxruntime-gpu lists
    the CUDA provider wherever it is installed, and falls back to the CPU when the CUDA or
    cuDNN libraries do not load (the caller then runs the interpreter, and says why)."""
    if device_of(xp) == "cuda" and CUDA not in session.get_providers():
        raise RuntimeError("onnxruntime could not start its CUDA provider (are the CUDA 12 and cuDNN 9 "
                           "libraries installed? pip install 'onnxruntime-gpu[cuda,cudnn]')")


def _pointer(a) -> int:
    """The device address of a contiguous NumPy or CuPy array."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


class BoundRunner:
    """`session.run` through IO binding on one device ("cuda" or "cpu"): inputs bound where
    they lie, outputs written into arrays allocated with `xp` on that device.

    Output shapes and dtypes are the compiled graph's (every compiled pass has static shapes).
    On the CPU the same binding runs on NumPy arrays: that is how it is tested without a GPU.
    """

    def __init__(self, session, model, xp, device: str, device_id: int = 0):
        from onnx import helper
        self.session, self.xp, self.device, self.device_id = session, xp, device, device_id
        self.outputs = {o.name: (tuple(d.dim_value for d in o.type.tensor_type.shape.dim),
                                 np.dtype(helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)))
                        for o in model.graph.output}

    def __call__(self, names: list[str], inputs: dict) -> list:
        xp = self.xp
        binding = self.session.io_binding()
        held = []  # the bound arrays must outlive the run
        for name, a in inputs.items():
            a = xp.ascontiguousarray(xp.asarray(a))
            held.append(a)
            binding.bind_input(name, self.device, self.device_id, a.dtype, list(a.shape), _pointer(a))
        outs = []
        for name in names:
            shape, dtype = self.outputs[name]
            out = xp.empty(shape, dtype=dtype)
            binding.bind_output(name, self.device, self.device_id, dtype, list(shape), _pointer(out))
            outs.append(out)
        if self.device != "cpu":  # what CuPy queued on its stream must be done before onnxruntime reads
            xp.cuda.get_current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        if self.device != "cpu":
            binding.synchronize_outputs()
        return outs
