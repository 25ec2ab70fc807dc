"""hessianflow: Hessian-based analysis and ABSA training for PyTorch models."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "hessianflow" / "_version.py").read_text()).group(1)

extras = {
    "plot": ["matplotlib>=3.5"],
    "test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.5", "ruff>=0.4"],
    # Peer libraries, for benchmarks/ only: measured side by side, never imported by the package.
    "bench": ["hessian-eigenthings==1.0.0a5", "curvlinops-for-pytorch", "scipy", "matplotlib>=3.5"],
}

setup(
    name="hessianflow",
    version=version,
    description="Hessian eigenvalues, spectral density, traces and ABSA training for PyTorch models",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hessianflow", "hessianflow.*", "models", "models.*"]),
    py_modules=["utils", "train", "train_resnet", "hessian_eig_driver"],
    install_requires=["torch>=2.2", "torchvision>=0.17", "numpy", "tqdm"],
    extras_require=extras,
    license="MIT",
)
