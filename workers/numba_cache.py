"""Fill numba's on-disk cache for pymatting on every core at once (`make setup` runs it).

rembg imports pymatting (its alpha matting), and pymatting's package import compiles 29 numba
functions with `cache=True`: about 47 s of one core the first time in a new virtualenv, after
which every process loads them from the cache beside pymatting's source in a few seconds. One
process compiles them one after another; this compiles two halves in two processes, so a fresh
set-up waits about half as long. The halves import pymatting's modules with its package
`__init__`s bypassed (each would import, and so compile, everything); the cache they leave is
the one a plain `import rembg` reads, which the last step checks (it says so if that import had
to compile anything the groups missed). Workers import pymatting only for the first task that
uses alpha matting (workers.session.defer_rembg_extras); `make test` and the Dockerfile run this.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time
import types
from pathlib import Path

# pymatting 1.1's modules in two groups of about equal compile time (measured on 2 cores).
GROUPS = (
    (
        "pymatting.laplacian.lbdm_laplacian",
        "pymatting.util.boxfilter",
        "pymatting.laplacian.cf_laplacian",
        "pymatting.laplacian.rw_laplacian",
        "pymatting.preconditioner.ichol",
    ),
    (
        "pymatting.alpha.estimate_alpha_sm",
        "pymatting.util.kdtree",
        "pymatting.util.distance",
        "pymatting.foreground.estimate_foreground_ml",
    ),
)


def _bypass_package_inits() -> None:
    """Make pymatting's packages importable without running their `__init__` modules."""
    packages = {name.rsplit(".", 1)[0] for group in GROUPS for name in group} | {"pymatting"}
    for name in sorted(packages):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(f"{name} is not a package")
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules[name] = package


def compile_group(index: int) -> None:
    """Import (and so compile, or load from the cache) one group's modules."""
    _bypass_package_inits()
    for name in GROUPS[index]:
        importlib.import_module(name)


def _cache_files() -> dict[Path, int]:
    """numba's cache files for pymatting, with their modification times."""
    spec = importlib.util.find_spec("pymatting")
    assert spec is not None and spec.origin is not None
    root = Path(os.environ.get("NUMBA_CACHE_DIR") or Path(spec.origin).parent)
    return {path: path.stat().st_mtime_ns for path in root.rglob("*.nb[ic]")}


def main() -> int:
    """Compile the groups side by side, then check that a plain import finds them cached."""
    started = time.monotonic()
    command = [sys.executable, "-m", __spec__.name if __spec__ else "workers.numba_cache"]
    groups = [subprocess.Popen([*command, str(i)]) for i in range(len(GROUPS))]
    failed = [i for i, process in enumerate(groups) if process.wait() != 0]
    if failed:  # a pymatting whose modules moved: the plain import below compiles what is left
        print(f"numba cache: group(s) {failed} failed; compiling in one process", flush=True)
    cached = _cache_files()
    import rembg  # noqa: F401  (pymatting's whole import, from the cache where it is filled)

    written = sum(1 for path, mtime in _cache_files().items() if cached.get(path) != mtime)
    if written:
        print(f"numba cache: the plain import wrote {written} file(s) the groups missed")
    print(f"numba cache for pymatting ready in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2:
        compile_group(int(sys.argv[1]))
    else:
        sys.exit(main())
