"""The package's shape: clients that stand alone, every package listed, no dependency's
private names. (The floors themselves are import-linter's contract, run by ``make lint``.)"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ratekeeper"
# the namedtuple API, public despite its underscore (it keeps clear of field names)
NAMEDTUPLE_API = {"_replace", "_asdict", "_make", "_fields"}
SERVER_SIDE = ("ratekeeper.app", "ratekeeper.process", "ratekeeper.admin", "ratekeeper.server",
               "ratekeeper.control", "ratekeeper.decision", "ratekeeper.storage")


def loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT / "tests").stdout
    return out.split()


def test_the_wsgi_client_and_middleware_load_no_server_module() -> None:
    """A WSGI origin importing SyncClient and the WSGI middleware loads neither a server
    module of ratekeeper nor aiohttp nor redis."""
    modules = loaded_after("from ratekeeper.client import SyncClient; "
                           "from ratekeeper.client.middleware import RatekeeperMiddleware")
    assert "ratekeeper.client.sync" in modules
    assert not [m for m in modules if m.startswith(SERVER_SIDE)]
    assert not [m for m in modules if m.split(".")[0] in ("aiohttp", "redis")]


def test_the_async_client_and_middleware_load_no_server_module() -> None:
    """An asyncio origin importing AsyncClient and the aiohttp middleware loads no server
    module of ratekeeper and no redis."""
    modules = loaded_after("from ratekeeper.client import AsyncClient; "
                           "from ratekeeper.client.middleware import ratekeeper_middleware")
    assert "ratekeeper.client.aio" in modules
    assert not [m for m in modules if m.startswith(SERVER_SIDE)]
    assert not [m for m in modules if m.split(".")[0] == "redis"]


def test_every_package_of_the_tree_is_listed_for_the_wheel() -> None:
    """pyproject.toml lists exactly the packages the tree has (ratekeeper.lua is lua/)."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in PACKAGE.rglob("__init__.py")}
    assert (ROOT / "lua" / "__init__.py").exists()
    assert sorted(listed) == sorted(found | {"ratekeeper.lua"})


def _own_private_names() -> set[str]:
    """Every _name ratekeeper defines itself: functions, classes, slots, attributes."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # (__slots__ entries)
    return {name for name in names if name.startswith("_") and not name.endswith("__")}


def test_no_private_name_of_a_dependency_is_used() -> None:
    """No module imports a dependency's _private module or name, and every obj._name read
    anywhere in the package is a name ratekeeper defines itself."""
    own = _own_private_names() | NAMEDTUPLE_API
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith(
                    "ratekeeper"):
                parts = node.module.split(".") + [alias.name for alias in node.names]
                found += [f"{where}: from {node.module} import {alias.name}"
                          for alias in node.names
                          if any(p.startswith("_") and not p.startswith("__") for p in parts)
                          and node.module != "__future__"]
            elif isinstance(node, ast.Import):
                found += [f"{where}: import {alias.name}" for alias in node.names
                          if any(p.startswith("_") for p in alias.name.split("."))]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.endswith("__") and node.attr not in own):
                found.append(f"{where}:{node.lineno}: ._{node.attr[1:]}")
    assert found == []
