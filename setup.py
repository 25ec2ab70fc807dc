"""hessianflow: Hessian-based analysis and ABSA training for PyTorch models.

The distribution installs one top-level package, ``hessianflow`` (the scripts' logic is
``hessianflow.cli``, with the console scripts below); the checkout's root files ``train.py``,
``train_resnet.py``, ``hessian_eig_driver.py``, ``utils.py`` and ``models/`` are thin re-exports for
HessianFlow's command lines and imports, and are not installed.
"""

import atexit
import re
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

# Build outside the checkout: setuptools' defaults, build/ and hessianflow.egg-info/, would be left in the
# source tree by `pip wheel .` (and a stale build/lib can carry a deleted module into the next wheel). Each
# setuptools run gets its own scratch directory, removed when it exits; the wheel itself goes where pip
# asks. Not for the legacy `setup.py develop` (a pip older than 21.3 doing `pip install -e .`), whose
# installed egg-link points at the egg-info and so needs it to stay.
options = {}
if "develop" not in sys.argv:
    scratch = tempfile.mkdtemp(prefix="hessianflow-build-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    options = {"build": {"build_base": str(Path(scratch) / "build")}, "egg_info": {"egg_base": scratch}}
version = re.search(r'__version__ = "([^"]+)"', (here / "hessianflow" / "_version.py").read_text()).group(1)

extras = {
    "plot": ["matplotlib>=3.5"],
    "transformers": ["transformers>=4.40"],
    "data": ["scikit-learn>=1.0"],  # the bundled handwritten digits: a real data set with no download
    "scipy": ["scipy>=1.8"],  # LinearOperator.to_scipy()
}
# pytest-xdist: pyproject's addopts run the suite on every core (-n auto)
extras["test"] = [
    "pytest>=7",
    "pytest-xdist>=3",
    "hypothesis>=6",
    "ruff>=0.4",
    *extras["plot"],
    *extras["transformers"],
    *extras["data"],
    *extras["scipy"],
    # the cross-library oracle (tests/test_curvlinops_oracle.py): never imported by the package
    "curvlinops-for-pytorch>=3.0",
]
# The documentation site (bash .ci/build_docs): Sphinx with autodoc/napoleon, the executed gallery
# (sphinx-gallery; its examples need the plot, transformers and data extras), Markdown pages (myst-parser),
# the furo theme, and Playwright to drive the system's chromium for the browser check (no browser download).
extras["docs"] = [
    "sphinx>=8",
    "sphinx-gallery>=0.17",
    "myst-parser>=3",
    "furo",
    "playwright>=1.40",
    *extras["plot"],
    *extras["transformers"],
    *extras["data"],
]
# Peer libraries, for benchmarks/ only: measured side by side, never imported by the package.
extras["bench"] = ["hessian-eigenthings==1.0.0a5", "curvlinops-for-pytorch", "scipy", "matplotlib>=3.5"]

setup(
    name="hessianflow",
    version=version,
    description="Hessian eigenvalues, spectral density, traces and ABSA training for PyTorch models",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hessianflow", "hessianflow.*"]),
    install_requires=["torch>=2.2", "torchvision>=0.17", "numpy", "tqdm"],
    extras_require=extras,
    options=options,
    entry_points={
        "console_scripts": [
            "hessianflow-train=hessianflow.cli.train:cli",
            "hessianflow-train-resnet=hessianflow.cli.train_resnet:cli",
            "hessianflow-eig=hessianflow.cli.eig:cli",
        ]
    },
    license="MIT",
)
