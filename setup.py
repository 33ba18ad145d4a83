from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="onlineaug",
    version="0.1.0",
    description="Online diffusion-based data augmentation for PyTorch: producers generate into a "
                "shared-memory pool, the trainer mixes on its GPU at batch time.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder (beside their torch references) and are
    # installed as onlineaug.kernels, so they never clash with the registry's `kernels` package.
    packages=find_packages(include=["onlineaug", "onlineaug.*"]) + ["onlineaug.kernels"],
    package_dir={"onlineaug.kernels": "kernels"},
    install_requires=[
        # floors are the versions this is tested with (the GPU machine: torch 2.11, triton 3.6)
        "torch>=2.11",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4.60",
        "diffusers>=0.42",
        "transformers>=5.0",
        "safetensors>=0.4",
        # diffusers' load_lora_weights needs the PEFT backend (LoRA of Diff-Mix and other fine-tuned generators)
        "peft>=0.17",
    ],
    extras_require={
        # triton ships with the CUDA builds of torch; kornia/timm/torchvision are the baselines and helpers
        "kernels": ["triton>=3.6"],
        "bench": ["kornia>=0.7", "timm>=1.0", "torchvision>=0.19", "matplotlib>=3.7"],
        # producers="ray": producer actors anywhere in a Ray cluster (onlineaug/ray_pool.py)
        "ray": ["ray>=2.40"],
        # pytorch-lightning: examples/lightning_datamodule.py, run by the tests; ray: tests/test_ray_producers.py
        "dev": ["pytest>=8", "pytest-timeout>=2", "pytest-xdist>=3.5", "kornia>=0.7", "timm>=1.0", "torchvision>=0.19",
                "matplotlib>=3.7", "pytorch-lightning>=2.4", "ray>=2.40"],
    },
    entry_points={"console_scripts": ["onlineaug=onlineaug.__main__:main"]},
)
