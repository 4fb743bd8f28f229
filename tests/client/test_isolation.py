"""The client package stays torch-free: importing it pulls in neither torch nor the server."""

import ast
import subprocess
import sys
from pathlib import Path

import client

FORBIDDEN = ("torch", "transformers", "server", "adapter_store", "peft", "safetensors")


def test_import_client_does_not_load_torch():
    code = ("import sys, client, client.cli; "
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(client.__file__).parent.parent)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_no_module_imports_heavy_packages():
    for path in Path(client.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] in FORBIDDEN], (path.name, names)
