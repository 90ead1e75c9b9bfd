"""Installs tfg_optim: optimizers that run as TensorFlow graph ops."""

import setuptools

setuptools.setup(
    name="tfg_optim",
    version="0.1.0",
    description=("Levenberg-Marquardt (TensorFlow Graphics compatible, "
                 "Riemannian, batched) and L-BFGS as TensorFlow graph ops."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["tfg_optim", "tfg_optim.*"]),
    python_requires=">=3.9",
    install_requires=["tensorflow>=2.16", "numpy", "absl-py"],
    # tensorflow-graphics is a test oracle too; it must be installed with
    # `pip install --no-deps tensorflow-graphics` (see README).
    extras_require={"test": ["pytest", "pytest-timeout", "pytest-xdist", "scipy"],
                    # `--plot` of tfg_optim/examples/pose_graph.py.
                    "plot": ["matplotlib"]},
    license="Apache-2.0",
)
