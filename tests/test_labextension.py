"""The JupyterLab extension (labextension/): its TypeScript unit tests (the event stream's
reducer, SSE parsing, Try it's requests) pass, and the install made it a prebuilt
extension that JupyterLab lists as enabled and OK.

Without Node.js the unit tests are skipped, except under CI, where they fail: the install
itself needs Node.js to build the extension."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LABEXTENSION = REPO / "labextension"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None and not os.environ.get("CI"), reason="Node.js is not installed (the extension's build needs it)")
def test_the_extensions_unit_tests_pass():
    assert NODE is not None, "Node.js is missing: pip install builds the JupyterLab extension with it"
    jest = LABEXTENSION / "node_modules" / "jest" / "bin" / "jest.js"
    assert jest.is_file(), "labextension/node_modules is missing: `pip install -e .` installs it (jlpm install)"
    out = subprocess.run([NODE, str(jest), "--ci"], cwd=LABEXTENSION, capture_output=True, text=True, timeout=300)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    counts = re.search(r"Tests:\s+(?:(\d+) failed, )?(\d+) passed, (\d+) total", report)
    assert counts and not counts.group(1) and int(counts.group(2)) >= 20, report


def test_jupyterlab_lists_the_extension_as_enabled_and_ok():
    pytest.importorskip("jupyterlab")
    jupyter = Path(sys.executable).with_name("jupyter")  # this environment's `jupyter labextension list`
    command = [str(jupyter), "labextension", "list"] if jupyter.exists() else [sys.executable, "-m", "jupyterlab.labextensions", "list"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    listing = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # without its colors
    assert re.search(r"^\s*jupyter-stream v\S+ enabled OK \(python, jupyter-stream\)$", listing, re.MULTILINE), listing
