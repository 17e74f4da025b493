"""The peers: which libraries are checked, how each is imported, and the extra that installs it.

Peers are optional: each is imported inside the check that uses it. A peer that cannot be imported is listed
in the report as skipped, with the reason and ``pip install 'finetune-ref[parity]'``.
"""

from __future__ import annotations

import importlib
import importlib.metadata

# peer name (as --peers takes it) -> the distribution that provides it
PEERS = {
    "peft": "peft",
    "bnb": "bitsandbytes",
    "torchao": "torchao",
    "transformers": "transformers",
}
EXTRA = "parity"  # setup.py extras_require key that installs every peer
INSTALL_HINT = f"pip install 'finetune-ref[{EXTRA}]'"
# A check needing several peers runs only when all are there (PEFT builds on transformers models).
ALWAYS = ("torch",)  # torch.optim.AdamW is the baseline of the optimizer checks; torch is a dependency


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_error(peer: str) -> str | None:
    """None if the peer imports, else one line saying why not and how to install it."""
    module = {"bnb": "bitsandbytes"}.get(peer, peer)
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install (ImportError, a CUDA probe, ...) is reported, not raised
        first = (str(e).splitlines() or [""])[0][:160]
        return f"cannot import {module}: {type(e).__name__}: {first}; install with {INSTALL_HINT}"
    return None


def parse_peers(text: str) -> tuple[str, ...]:
    """'peft,bnb' -> ('peft', 'bnb'); an unknown name is a ValueError naming the known ones."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise ValueError(f"--peers {text!r}: unknown peer {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(PEERS)}")
    return names
