"""Shared helpers for the kernel tests: the one tolerance table, shapes, seeded generators."""
import torch

# (rtol, atol) per dtype of the compared tensor; fp32/fp16/bf16 are torch.testing's defaults.
# uint8 allows 1 level: pixel_mix rounds an fp32 value, and FMA contraction on the GPU can move it
# across a .5 boundary. Ops that only copy pixels (box_mix) are compared with torch.equal instead.
TOLERANCES = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.uint8: (0.0, 1.0),
}

# odd shapes (B, C, H, W): partial blocks, one sample, several blocks per sample
SHAPES = [(1, 3, 31, 47), (7, 3, 64, 33), (3, 3, 17, 16)]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None) -> None:
    """Compare with the tolerance of ``dtype`` (default: ``expected.dtype``) from TOLERANCES."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    if expected.dtype == torch.uint8:
        actual, expected = actual.to(torch.int16), expected.to(torch.int16)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rand_uint8(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=gen, device=gen.device, dtype=torch.uint8)


MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def mean_std(device):
    return (torch.tensor(MEAN, dtype=torch.float32, device=device),
            torch.tensor(STD, dtype=torch.float32, device=device))


def count_kernel_launches(monkeypatch) -> list:
    """The names of the Triton kernels launched from now on (``_backend.jit`` runs once per launch).

    Lets a test tell which path ``backend="auto"`` took: the kernel, or the plain-torch reference.
    """
    from onlineaug.kernels import _backend

    launches, jit = [], _backend.jit

    def recording_jit(fn):
        launches.append(fn.__name__)
        return jit(fn)

    monkeypatch.setattr(_backend, "jit", recording_jit)
    return launches
