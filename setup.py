"""Packaging for the fine-tuning reference: ``pip install -e .`` (add ``[test]`` for the oracle libraries).

Installing adds exactly one import name, ``finetune_ref``. The rooms of the project are folders at the top of the
repository and become its sub-packages (``models/`` -> ``finetune_ref.models``, ...), so no generic name such as
``models`` or ``kernels`` (Hugging Face's kernel hub is a PyPI package of that name) is installed.
"""

import os
import sys

from setuptools import setup

# Building from this checkout must not make its folders importable: Hugging Face's `kernels` package (required by
# transformers >= 5.25) registers a setuptools egg-info hook that imports `kernels`, which our kernels/ folder would
# shadow when the build runs without isolation (`pip install --no-build-isolation`).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

# Each room, in the order imports may point: a room imports only rooms before it (tests/test_layout.py).
ROOMS = ["models", "lora", "kernels", "optim", "qlora", "gptq", "full", "train", "recipes", "parity", "serve", "cli"]

setup(
    name="finetune-ref",
    version="0.1.0",
    description="Reference implementation of full fine-tuning, LoRA and QLoRA in PyTorch and Triton",
    python_requires=">=3.10",
    packages=["finetune_ref"] + [f"finetune_ref.{room}" for room in ROOMS],
    package_dir={"finetune_ref": "finetune_ref", **{f"finetune_ref.{room}": room for room in ROOMS}},
    # Ready run configurations (`finetune train --config qlora`), beside the recipe dataclasses they set.
    package_data={"finetune_ref.recipes": ["*.yaml"]},
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
        "pyyaml>=6",  # `finetune train --config FILE.yaml`
    ],
    extras_require={
        # Oracles the tests compare against, and Triton (kernel tests run in its CPU interpreter).
        # protobuf: transformers converting a sentencepiece model (oracle); the compare extra so that
        # `finetune compare`'s forgetting score and plot are tested too.
        # tensorboard and wandb: what `--log` writes is read back with their own readers.
        # peft >= 0.22: its modules_to_save rule (whole name components, peft/utils/other.py) is the one lora/ follows.
        # setuptools >= 70.1 builds wheels itself (bdist_wheel): a venv's own older setuptools cannot install this
        # checkout with `pip install --no-build-isolation`, which the layout checks use.
        "test": ["setuptools>=70.1", "pytest", "transformers>=4.45", "peft>=0.22", "bitsandbytes>=0.45", "triton",
                 "protobuf", "chatterbot-corpus==1.3.3", "matplotlib>=3.7", "torchao>=0.10",
                 "fastapi", "uvicorn", "httpx", "openai", "tensorboard", "wandb"],
        "triton": ["triton"],
        # `finetune parity`: the implementations it checks ours against (any subset may be installed).
        "parity": ["transformers>=4.45", "peft>=0.22", "bitsandbytes>=0.45", "torchao>=0.10"],
        # `finetune serve`: the OpenAI-compatible HTTP server (serve/).
        "serve": ["fastapi>=0.100", "uvicorn>=0.20"],
        # `finetune compare`: a second, general-English corpus (chatterbot-corpus: YAML dialogue, BSD-3) for the
        # forgetting score, and matplotlib for the loss-curve plot.
        "compare": ["chatterbot-corpus==1.3.3", "matplotlib>=3.7"],
        # `finetune train --log tensorboard|wandb`, `finetune plot` and `finetune train --plot`.
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["finetune = finetune_ref.cli.main:main"]},
)
