"""The source distribution builds: it carries every file the extension's build reads.

setuptools packs the Python packages and the extension's listed sources only: no headers, and
no CUDA sources where the sdist is made without nvcc (MANIFEST.in adds them)."""
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_OUTPUTS = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", "*.o", "results")


def _tree_files(top):
    return {os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, top))
            for f in files if not f.endswith((".pyc", ".so", ".o"))}


def test_the_sdist_holds_every_source_the_build_reads(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=BUILD_OUTPUTS)  # the working tree's egg-info stays as it is
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-cuda"))  # made where there is no nvcc
    env.pop("ALBEF_FAST_NO_EXTENSION", None)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=source, env=env,
                   check=True, capture_output=True)
    (archive,) = tmp_path.glob("albef_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = _tree_files("csrc") | {f for f in _tree_files("kernels") | _tree_files("albef_fast") if f.endswith(".py")}
    assert any(f.endswith(".h") for f in needed) and any(f.endswith(".cu") for f in needed)
    assert needed - packed == set()
    assert {"setup.py", "pyproject.toml", "README.md"} <= packed
