"""Backend selection, lazy Triton import and input validation shared by the kernels.

Every public op takes ``backend="auto" | "triton" | "torch"``:

* ``"auto"``: the Triton kernel for CUDA tensors when Triton imports, the plain-torch reference
  everywhere else.
* ``"triton"``: the Triton kernel. On CPU tensors this is allowed only under Triton's interpreter
  (``TRITON_INTERPRET=1`` in the environment), which is how the kernels are tested without a GPU.
* ``"torch"``: the plain-torch reference twin (``<op>_reference``).

Triton is imported lazily: importing :mod:`kernels` never imports it. Triton fixes the mode of its
own library functions when it is first imported, so ``TRITON_INTERPRET=1`` must be set before
anything imports triton (a clear RuntimeError says so otherwise). The kernel modules write
their ``@triton.jit`` kernels as plain module-level functions (annotations stay strings through
``from __future__ import annotations``) and declare a placeholder ``tl = None``;
:func:`jit` binds that module global to ``triton.language`` and applies ``triton.jit`` on the
first launch. Kernels must live at module level with ``tl`` as a module global because Triton's
interpreter re-executes the kernel source in the module's globals.

Index-range checks (``partner``, ``fractal_index``, ``fg_index``, labels, split codes) read tensor
values. On a CUDA tensor that means a host synchronisation, so the launchers take
``validate: bool | None = None``:

* ``None`` (default): check value ranges when the tensors are on the CPU (no device to wait for),
  skip them on CUDA.
* ``True``: always check; on CUDA this SYNCHRONISES the stream (a debugging aid).
* ``False``: never check.

Unchecked out-of-range indices never read memory outside the tensors: the Triton kernels mask those
loads and poison what they can (NaN in float outputs and in ``kept_fraction``), the torch path hits
PyTorch's own index checks (an ``IndexError`` on CPU, a device-side assert on CUDA).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterable, Optional, Sequence

import torch

BACKENDS = ("auto", "triton", "torch")
_TRUE_STRINGS = ("1", "true", "yes", "on")

# output dtypes of the normalizing ops
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpret_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_STRINGS


@functools.lru_cache(maxsize=None)
def _import_triton():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return None, f"{type(exc).__name__}: {exc}"
    return triton, ""


def triton_available() -> bool:
    """True when ``import triton`` works."""
    return _import_triton()[0] is not None


def import_triton():
    """Return the ``triton`` module or raise an ImportError that says how to get it."""
    triton, why = _import_triton()
    if triton is None:
        raise ImportError(
            f"backend='triton' needs the triton package, which failed to import ({why}). "
            "Install it (pip install triton; it ships with CUDA builds of torch) or pass backend='torch'."
        )
    return triton


_JIT_CACHE: dict = {}


def jit(fn: Callable):
    """``triton.jit(fn)``, built on first use and cached per function and interpreter mode.

    ``triton.jit`` decides at decoration time whether it builds an interpreted or a compiled kernel,
    so the cache is keyed on ``TRITON_INTERPRET`` as well. Binds the module global ``tl`` of
    ``fn``'s module to ``triton.language`` (see the module docstring).
    """
    key = (fn, interpret_enabled())
    kernel = _JIT_CACHE.get(key)
    if kernel is None:
        triton = import_triton()
        _check_import_mode(triton, interpret=key[1])
        fn.__globals__["tl"] = triton.language
        kernel = _OnTensorsDevice(triton.jit(fn))
        _JIT_CACHE[key] = kernel
    return kernel


class _OnTensorsDevice:
    """A jitted kernel whose launches run with the first tensor argument's CUDA device made current.

    Triton launches on the *current* device; a trainer on ``cuda:1`` whose current device is 0 (a DDP rank
    without ``torch.cuda.set_device``) would otherwise fail, or use the wrong device's stream.
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            if device.type != "cuda":
                return launch(*args, **kwargs)
            with torch.cuda.device(device):
                return launch(*args, **kwargs)

        return run


def _check_import_mode(triton, interpret: bool) -> None:
    """Raise if Triton was imported in the other mode than the one asked for now.

    Triton decorates its own library functions (``tl.zeros``, ``tl.sum``, ...) when it is imported,
    interpreted or compiled according to ``TRITON_INTERPRET`` at that moment; a kernel built in the
    other mode then fails deep inside Triton. Inconclusive on Triton versions that do not expose
    the interpreter class: then nothing is checked.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
        imported_interpreted = isinstance(triton.language.standard.zeros, InterpretedFunction)
    except Exception:
        return
    if imported_interpreted != interpret:
        raise RuntimeError(
            f"triton was imported with TRITON_INTERPRET={'1' if imported_interpreted else 'unset/0'} but it is now "
            f"{os.environ.get('TRITON_INTERPRET', 'unset')!r}: Triton fixes the mode of its own library when it is "
            "first imported. Set TRITON_INTERPRET before anything imports triton (top of the script, or a test "
            "conftest), and keep it for the whole process."
        )


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Map ``backend`` to ``"triton"`` or ``"torch"`` for tensors on ``device``; raise if impossible."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}; pass 'auto' (Triton on CUDA, "
                         "torch elsewhere), 'triton' or 'torch'.")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    # check the device before importing Triton: an import without TRITON_INTERPRET=1 would fix
    # Triton's own library functions in compiled mode for the rest of the process
    if device.type == "cpu" and not interpret_enabled():
        raise ValueError(
            f"{op}: backend='triton' got CPU tensors, but Triton kernels run on CPU only through Triton's "
            "interpreter. Set the environment variable TRITON_INTERPRET=1 (before triton is first imported), "
            "move the tensors to a CUDA device, or pass backend='torch' / 'auto'."
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: backend='triton' supports CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                         f"got tensors on {device}. Pass backend='torch'.")
    import_triton()  # raises a clear ImportError when Triton is missing
    return "triton"


def check_no_grad(op: str, backend: str, **tensors: torch.Tensor) -> None:
    """The Triton kernels have no backward: refuse inputs that require grad instead of dropping it."""
    if backend != "triton" or not torch.is_grad_enabled():
        return
    for name, tensor in tensors.items():
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but the Triton kernel has no backward pass; "
                             f"pass {name}.detach(), run under torch.no_grad(), or use backend='torch'.")


def should_validate(validate: Optional[bool], device: torch.device, op: str) -> bool:
    """Whether to run value-range checks; see the module docstring."""
    if validate is None:
        return device.type == "cpu"
    if not isinstance(validate, bool):
        raise TypeError(f"{op}: validate must be None, True or False, got {validate!r}.")
    return validate


# --------------------------------------------------------------------------------------------------
# Validation helpers: each raises a TypeError/ValueError that names the argument, the bad value,
# what was expected and how to fix it.
# --------------------------------------------------------------------------------------------------

def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d) for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    value,
    *,
    dtypes: Sequence[torch.dtype],
    shape: Optional[Sequence[Optional[int]]] = None,
    shape_doc: str = "",
    device: Optional[torch.device] = None,
    device_of: str = "",
    contiguous: bool = True,
) -> torch.Tensor:
    """Check type, dtype, shape (``None`` entries are free), device and contiguity of one tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {value.dtype}, expected {_dtype_names(dtypes)}; "
                        f"convert it with {name}.to({dtypes[0]}).")
    if shape is not None:
        ok = value.dim() == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape))
        if not ok:
            doc = shape_doc or str(tuple("*" if s is None else s for s in shape))
            raise ValueError(f"{op}: {name} has shape {tuple(value.shape)}, expected {doc}.")
    if device is not None and value.device != device:
        raise ValueError(f"{op}: {name} is on {value.device} but {device_of or 'the other inputs'} is on "
                         f"{device}; move it with {name}.to({str(device)!r}).")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{op}: {name} (shape {tuple(value.shape)}, stride {value.stride()}) is not contiguous; "
                         f"pass {name}.contiguous().")
    return value


def check_index_range(op: str, name: str, index: torch.Tensor, low: int, high: int, what: str,
                      allowed_extra: Sequence[int] = ()) -> None:
    """Raise if some value of ``index`` lies outside ``[low, high)`` (values in ``allowed_extra`` pass).

    Reads tensor values: call it only when :func:`should_validate` says so.
    """
    if index.numel() == 0:
        return
    bad = (index < low) | (index >= high)
    for extra in allowed_extra:
        bad &= index != extra
    if bool(bad.any()):
        position = ", ".join(str(int(i)) for i in bad.nonzero()[0])
        value = int(index[bad][0])
        extra = "".join(f" or {e}" for e in allowed_extra)
        raise ValueError(f"{op}: {name}[{position}] = {value} is out of range; expected {low} <= {name} < {high}"
                         f"{extra} ({what}).")


def check_value_range(op: str, name: str, values: torch.Tensor, low: float, high: float, hint: str = "") -> None:
    """Raise if a float tensor has values outside ``[low, high]`` or non-finite values (reads values)."""
    if values.numel() == 0:
        return
    bad = ~((values >= low) & (values <= high))
    if bool(bad.any()):
        position = ", ".join(str(int(i)) for i in bad.nonzero()[0])
        value = float(values[bad][0])
        raise ValueError(f"{op}: {name}[{position}] = {value} is outside [{low}, {high}]{hint}.")


def check_out_dtype(op: str, out_dtype) -> torch.dtype:
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype={out_dtype!r} is not supported; pass one of {FLOAT_DTYPES}.")
    return out_dtype


def check_mean_std(op: str, mean, std, device: torch.device, check_values: bool):
    """Validate the per-channel (3,) float32 mean and std tensors."""
    check_tensor(op, "mean", mean, dtypes=(torch.float32,), shape=(3,), device=device, device_of="the images")
    check_tensor(op, "std", std, dtypes=(torch.float32,), shape=(3,), device=device, device_of="the images")
    if check_values:
        if bool((std == 0).any()) or not bool(torch.isfinite(std).all()):
            raise ValueError(f"{op}: std={std.tolist()} must be finite and non-zero (it divides the pixels).")
