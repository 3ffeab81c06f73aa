"""The build itself: error messages survive a toolchain that links libstdc++ statically, and a
missing compiled library says how to build it.

On the GPU machine (2026-11-28) every bad call whose message held a number crashed the process: the
extension carried its own copy of libstdc++, whose exported symbols mixed with the process's shared
one. Linked the same way here (-static-libstdc++, plus the -Bsymbolic-functions that Ubuntu's Python,
the GPU machine's, puts in every extension's link) without setup.py's --exclude-libs flag, the same
messages come out cut short after the first number ("lengths["); with it, whole.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def static_libstdcxx_available() -> bool:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    found = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True)
    return os.path.isabs(found.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not static_libstdcxx_available(),
                    reason="needs a Linux C++ toolchain with a static libstdc++")
def test_error_messages_whole_with_static_libstdcxx(tmp_path):
    for name in ("setup.py", "README.md", "csrc", "pka_ext", "python_ref"):
        src = os.path.join(REPO, name)
        copy = shutil.copytree if os.path.isdir(src) else shutil.copy
        copy(src, tmp_path / name, **({"ignore": shutil.ignore_patterns("*.so", "__pycache__")}
                                      if os.path.isdir(src) else {}))
    env = dict(os.environ, PKA_FORCE_CPU="1", LDFLAGS="-static-libstdc++ -Wl,-Bsymbolic-functions")
    env.pop("PKA_REQUIRE_CUDA", None)  # set by ./run when nvcc is present; this build is CPU-only
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "-static-libstdc++" in build.stdout + build.stderr  # the link this test is about

    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import torch, pka_ext\n"
        f"assert pka_ext.__file__.startswith({str(tmp_path)!r}), pka_ext.__file__\n"
        "op = torch.ops.pka_ext.pka_fwd\n"
        "q, a = torch.randn(2, 1, 4, 2), torch.eye(4)\n"
        "for call in (lambda: op(q, q, q, a, a, torch.tensor([5, 1]), 1.0, 0.0, None),\n"
        "             lambda: op(q, q, q, a[:3, :3], a, None, 1.0, 0.0, None),\n"
        "             lambda: op(q, q, q, a, a, None, 1.0, 1.5, torch.tensor([1]))):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        print(str(e).splitlines()[0])\n"
    )
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.splitlines() == [
        "lengths[0] = 5 is outside [0, T=4]",
        "a_k must be [4, 4] or [1, 4, 4] to match q of shape [2, 1, 4, 2], got [3, 3]",
        "dropout_p must be in [0, 1), got 1.5",
    ], run.stdout


def test_sdist_carries_every_source_and_test(tmp_path):
    """An sdist builds on its own: every C++/CUDA source and header, and the test suite with its
    emulator sources, reach the archive (setuptools alone takes only the sources setup.py names,
    and in a CPU-only run not even the CUDA ones)."""
    import tarfile

    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "csrc", "pka_ext",
                 "python_ref", "tests", "benchmarks"):
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, tmp_path / name,
                            ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "results"))
        else:
            shutil.copy(src, tmp_path / name)
    env = dict(os.environ, PKA_FORCE_CPU="1")
    env.pop("PKA_REQUIRE_CUDA", None)
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (archive,) = (tmp_path / "dist").iterdir()
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = set()
    for top, suffixes in (("csrc", (".h", ".cuh", ".cpp", ".cu")), ("tests", (".py", ".h", ".cpp")),
                          ("benchmarks", (".py", ".sh"))):  # tests import and run the benchmarks
        for folder, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "results")]
            wanted |= {os.path.relpath(os.path.join(folder, f), REPO) for f in files
                       if f.endswith(suffixes)}
    assert any(w.endswith(".cuh") for w in wanted) and "tests/conftest.py" in wanted
    assert "benchmarks/quality.py" in wanted and "benchmarks/gpu_check.sh" in wanted
    assert wanted <= packed, sorted(wanted - packed)


def test_a_missing_compiled_library_says_how_to_build_it(tmp_path):
    shutil.copytree(os.path.join(REPO, "pka_ext"), tmp_path / "pka_ext",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # An editable install's finder would still find the repository's _C: take it out.
    code = textwrap.dedent("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path
                            if "Editable" not in getattr(f, "__name__", "")]
        sys.path_hooks[:] = [h for h in sys.path_hooks
                             if "editable" not in getattr(h, "__module__", "")]
        sys.path_importer_cache.clear()
        import pka_ext
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0
    assert ("ImportError: pka_ext's compiled library (pka_ext._C) is missing or failed to load "
            "(No module named 'pka_ext._C')") in run.stderr, run.stderr
    assert "pip install --no-build-isolation -e ." in run.stderr
    assert "circular import" not in run.stderr
