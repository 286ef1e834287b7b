"""grpo_megatron: GRPO/GSPO RL post-training of megatron-core (MoE) models with SGLang rollouts."""
from setuptools import find_packages, setup

setup(
    name="grpo_megatron",
    version="0.1.0",
    description="GRPO / GSPO / DAPO RL post-training for megatron-core MoE models with SGLang rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["grpo_megatron", "grpo_megatron.*"]),
    # the dry run's model shapes (HF config.json files, no weights) and the simulation's C++ shim source
    package_data={"grpo_megatron.plan": ["hf_configs/*.json"], "grpo_megatron.simulation": ["*.cpp"]},
    python_requires=">=3.10",
    # No CPU pins here: GPU images bring their own torch / megatron-core builds. The versions this project
    # was tested with are in requirements-tested.txt (pip install ... -c requirements-tested.txt).
    install_requires=[
        "torch>=2.4",
        # The tested range (grpo_megatron/platform/megatron_version.py refuses others at start-up): CI runs
        # 0.16.1 and 0.19.2. 0.17+ declare Python >= 3.12; on 3.11 see scripts/install_megatron_019.sh.
        "megatron-core>=0.16.1,<0.20",
        # HF <-> megatron-core name mapping, imported by every model build. Its own megatron/transformers
        # requirements sit behind its `megatron` extra (none are required), so nothing else is pinned by it.
        "mbridge>=0.15.1,<0.16",
        "numpy",
        "transformers>=4.51",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "psutil",
        "packaging",  # the megatron-core version check at start-up
        "einops",
        # HTTP client of the remote reward service (rollout/rewards/remote.py) and the SGLang client.
        "httpx",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        # NVIDIA apex is not on PyPI (PyPI's `apex` is an unrelated project): build it from NVIDIA's source.
        "gpu": ["transformer-engine[pytorch]"],
        # The trainer only speaks HTTP to SGLang; the server runs in its own environment.
        "sglang": ["requests"],
        "logging": ["tensorboard", "wandb"],
        "plots": ["matplotlib"],
        "math": ["math-verify"],
        "parquet": ["pyarrow"],
        # Everything the code imports except TransformerEngine (which builds against the cluster's CUDA):
        # a GPU cluster installs `.[gpu,cluster]`, CI checks `.[cluster]` in a fresh venv.
        "cluster": ["httpx", "requests", "tensorboard", "wandb", "math-verify", "pyarrow"],
    },
    entry_points={"console_scripts": ["grpo-megatron-train=grpo_megatron.train:main"]},
)
