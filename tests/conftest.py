"""Shared pytest fixtures. Keep this small: one fixture per shared resource, heavy imports inside.

* ``smollm2_dir``: the converted SmolLM2-135M-Instruct directory (converted once, cached under
  ``$FINETUNE_CACHE_DIR`` or ``~/.cache/finetune-ref``; see models/default_model.py).
* ``pydoc_prose``: a few KB of English prose from CPython's own docs (``pydoc_data.topics``).
* ``pydoc_text_window``: the first 256 SmolLM2 tokens of ``pydoc_prose``, shape (1, 256), int64.

* ``one_thread``: one intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``).

Tests that use the real 135M model are marked ``@pytest.mark.real_model`` (slow-ish, still run by default).
"""

import pathlib
import sys

import pytest

# The checkout's folders (models/, kernels/, ...) are sub-packages of the installed finetune_ref, not top-level
# packages. `python -m pytest` puts the current directory on sys.path, where kernels/ would pass for Hugging
# Face's kernel-hub package that bitsandbytes imports: keep only installed names importable, as for a user.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT]

PYDOC_TOPIC = "naming"  # "Naming and binding": plain English prose, little code
WINDOW_TOKENS = 256


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the real SmolLM2-135M model (slow-ish, runs by default)")


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and immune to OpenMP stalls when the 2 cores are shared (with two
    threads, steps of a few microseconds each can become 10-100x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """Hugging Face directory of SmolLM2-135M-Instruct (respects FINETUNE_CACHE_DIR)."""
    from finetune_ref.models.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def pydoc_prose() -> str:
    """English prose from the Python reference docs shipped with CPython (no network needed)."""
    from pydoc_data.topics import topics

    return topics[PYDOC_TOPIC]


@pytest.fixture(scope="session")
def pydoc_text_window(smollm2_dir, pydoc_prose):
    """(1, 256) int64 token ids: the start of ``pydoc_prose`` under the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_dir)(pydoc_prose, return_tensors="pt").input_ids
    assert ids.shape[1] >= WINDOW_TOKENS, f"topic {PYDOC_TOPIC!r} is shorter than {WINDOW_TOKENS} tokens"
    return ids[:, :WINDOW_TOKENS]  # (1, 256)
