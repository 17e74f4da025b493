"""Every script in benchmarks/ imports: the scripts are run by hand, not by the suite, so a name moved or renamed in
the package (e.g. a helper that moved from cli/ to train/) would otherwise break them unnoticed until the next
measurement. One fresh interpreter, outside the checkout, with benchmarks/ on the path as the scripts put it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))


def test_every_benchmark_script_imports(tmp_path):
    assert {"bench_training", "claims", "claims_runs"} <= set(SCRIPTS)
    code = (f"import importlib, sys\nsys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
            f"for name in {SCRIPTS!r}:\n    importlib.import_module(name)\nprint('OK')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-2000:]
