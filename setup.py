"""megatron-tsp: folded tensor and sequence parallelism (TSP) for Megatron-LM."""

from setuptools import find_packages, setup

setup(
    name="megatron-tsp",
    version="0.1.0",
    description="TSP (folded tensor and sequence parallelism) as a Megatron-LM plugin",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_tsp", "megatron_tsp.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch==2.11.*",
        "megatron-core==0.19.*",
        "numpy",
        "pyyaml",
        "psutil",  # Megatron needs it to save torch_dist checkpoints
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "test": ["pytest", "matplotlib"],  # matplotlib: the planner's --plot
    },
)
