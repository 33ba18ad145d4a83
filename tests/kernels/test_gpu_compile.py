"""Compile every Triton kernel for an H100 (sm_90) with the installed Triton, without a GPU.

The interpreter runs the kernels' Python semantics on CPU, not Triton's compiler: type promotion,
constexpr handling or layout problems would only show on a GPU. This test runs Triton's frontend,
its GPU passes and ptxas (shipped with Triton) ahead of time, in a subprocess because Triton fixes
its interpreted/compiled mode when it is first imported. It also checks the property the
concat_blend design relies on: vectorised uint8 loads and fp32 stores when W is a multiple of 16.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def compile_all() -> None:
    """Build each kernel once for sm_90 (pointer and H, W arguments 16-divisible, as at 224 px)."""
    sys.path.insert(0, str(REPO_ROOT))
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from onlineaug.kernels import _backend

    modules = {name: sys.modules[f"onlineaug.kernels.{name}"] for name in ("concat_blend", "box_mix", "pixel_mix", "composite")}

    def build(fn, signature, constexprs, div16=(), **options):
        names = list(signature)
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if (signature[name].startswith("*") or name in div16)}
        full = {name: ("constexpr" if name in constexprs else ty) for name, ty in signature.items()}
        src = ASTSource(_backend.jit(fn).kernel, full, constexprs=constexprs, attrs=attrs)
        ptx = triton_compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, **options)).asm["ptx"]
        print(f"compiled {fn.__name__} {constexprs}", flush=True)
        return ptx

    ptx = build(modules["concat_blend"]._concat_blend_kernel, dict(
        orig_ptr="*u8", gen_ptr="*u8", frac_ptr="*u8", out_ptr="*fp32", split_ptr="*i64", flip_ptr="*u8",
        bw_ptr="*fp32", lam_ptr="*fp32", fidx_ptr="*i64", mean_ptr="*fp32", std_ptr="*fp32", H="i32", W="i32",
        num_fractals="i32", n_tiles_h="i32", n_tiles_w="i32", BLOCK_H="constexpr", BLOCK_W="constexpr"),
        {"BLOCK_H": 32, "BLOCK_W": 32}, div16=("H", "W"))
    vector_loads = re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.b32", ptx)
    vector_stores = re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx)
    print(f"concat_blend: {len(vector_loads)} vector loads, {len(vector_stores)} vector stores")
    if not vector_loads or not vector_stores:
        raise SystemExit("concat_blend lost its vectorised loads/stores")
    build(modules["box_mix"]._box_mix_kernel, dict(
        img_ptr="*u8", out_ptr="*u8", partner_ptr="*i64", boxes_ptr="*i64", kept_ptr="*fp32", B="i32", H="i32",
        W="i32", n_tiles_h="i32", n_tiles_w="i32", C="constexpr", BLOCK_H="constexpr", BLOCK_W="constexpr"),
        {"C": 3, "BLOCK_H": 32, "BLOCK_W": 32}, div16=("H", "W"))
    for dtype in ("u8", "bf16"):
        build(modules["pixel_mix"]._pixel_mix_kernel, dict(
            img_ptr=f"*{dtype}", out_ptr=f"*{dtype}", partner_ptr="*i64", lam_ptr="*fp32", B="i32", CHW="i32",
            n_blocks="i32", IS_UINT8="constexpr", BLOCK="constexpr"),
            {"IS_UINT8": dtype == "u8", "BLOCK": 2048}, div16=("CHW",))
    build(modules["composite"]._composite_kernel, dict(
        bg_ptr="*u8", fg_ptr="*u8", out_ptr="*bf16", vis_ptr="*fp32", idx_ptr="*i64", scale_ptr="*fp32",
        center_ptr="*fp32", flip_ptr="*u8", mean_ptr="*fp32", std_ptr="*fp32", N="i32", H="i32", W="i32", Hf="i32",
        Wf="i32", n_blocks="i32", NORMALIZE="constexpr", BLOCK="constexpr"),
        {"NORMALIZE": True, "BLOCK": 512}, div16=("H", "W"), enable_fp_fusion=False)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("compiled ") == 5


if __name__ == "__main__":
    compile_all()
