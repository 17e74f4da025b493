"""Packaging for the fine-tuning reference: ``pip install -e .`` (add ``[test]`` for the oracle libraries)."""

from setuptools import find_packages, setup

setup(
    name="finetune-ref",
    version="0.1.0",
    description="Reference implementation of full fine-tuning, LoRA and QLoRA in PyTorch and Triton",
    python_requires=">=3.10",
    packages=find_packages(include=["models", "lora", "qlora", "full", "kernels", "finetune"]),
    install_requires=[
        # The README pins torch==2.13.0 (a CPU wheel); any recent torch works.
        "torch>=2.4",
        "numpy",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "gguf>=0.10",
        "jinja2",  # chat templates, rendered as transformers does
        "tqdm",
    ],
    extras_require={
        # Oracles the tests compare against, and Triton (kernel tests run in its CPU interpreter).
        # protobuf: transformers converting a sentencepiece model (oracle); the compare extra so that
        # `finetune compare`'s forgetting score and plot are tested too.
        "test": ["pytest", "transformers>=4.45", "peft>=0.13", "bitsandbytes>=0.45", "triton", "protobuf",
                 "chatterbot-corpus==1.3.3", "pyyaml>=6", "matplotlib>=3.7"],
        "triton": ["triton"],
        # `finetune compare`: a second, general-English corpus (chatterbot-corpus: YAML dialogue, BSD-3) for the
        # forgetting score, and matplotlib for the loss-curve plot.
        "compare": ["chatterbot-corpus==1.3.3", "pyyaml>=6", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["finetune = finetune.cli:main"]},
)
