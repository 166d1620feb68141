"""Install dept_fast; the top-level ``kernels/`` folder installs as ``dept_fast.kernels``.

A top-level importable ``kernels`` package would shadow the PyPI package of that name, which
transformers probes for, so it lives inside the ``dept_fast`` namespace once installed.
"""
from setuptools import setup

setup(
    name="dept_fast",
    version="0.1.0",
    description="Triton kernels for DePT and Prefix-Tuning soft-prompt fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["dept_fast", "dept_fast.ops", "dept_fast.modules", "dept_fast.hf", "dept_fast.checkpoint",
              "dept_fast.vllm", "dept_fast.kernels"],
    package_dir={"dept_fast": "dept_fast", "dept_fast.kernels": "kernels"},
    install_requires=[
        # CPU users: install the CPU wheel of torch first; a bare `torch` may pull a CUDA build.
        "torch>=2.4",
        # Triton ships for Linux x86-64 only; elsewhere dept_fast runs its PyTorch reference path.
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=5.15",  # the lowest release the test suite passes with (T5 attention before it)
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "peft>=0.13", "matplotlib>=3.5"],
    },
)
