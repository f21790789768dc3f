"""The C++ CPU kernels: built lazily and cached, never at import; one warning and the torch
paths where they cannot be built."""

import os
import subprocess
import sys

import torch

from fusedvlm import native


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    full.pop("TRITON_INTERPRET", None)
    full.pop("FUSEDVLM_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full)


def test_import_never_builds():
    code = (
        "import sys, fusedvlm, fusedvlm.kernels, fusedvlm.model, fusedvlm.session, fusedvlm.cli\n"
        "from fusedvlm import native\n"
        "assert native._load.cache_info().currsize == 0, 'built at import'\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'cpp_extension imported at import'\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr


def test_no_compiler_falls_back_to_torch_with_one_warning(tmp_path):
    """A machine without a usable compiler: the ops still run (torch paths), with one warning."""
    code = (
        "import warnings, torch\n"
        "from fusedvlm.kernels import packed_attention, pairwise_cosine_stats\n"
        "from fusedvlm.kernels.packed_attention import implementation\n"
        "from fusedvlm.packing import cu_seqlens_from_lengths\n"
        "from fusedvlm.ref.packed_attention import packed_attention as ref\n"
        "q = torch.randn(9, 2, 8); cu = cu_seqlens_from_lengths([4, 5])\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    outs = [packed_attention(q, q, q, cu) for _ in range(3)]\n"
        "    pairwise_cosine_stats(q[:, 0], q[:, 1], cu)\n"
        "    torch.ops.fusedvlm.packed_attention(q, q, q, cu, cu, None, None, True, 0.3)\n"
        "mine = [w for w in caught if 'C++ CPU kernels could not be built' in str(w.message)]\n"
        "assert len(mine) == 1, [str(w.message) for w in caught]\n"
        "assert implementation(q) == 'torch'\n"
        "torch.testing.assert_close(outs[0], ref(q, q, q, cu))\n"
        "print(mine[0].message)\n"
    )
    done = _run(code, CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not be built" in done.stdout


def test_built_once_and_cached():
    """A second process finds the library built (no compile), keyed by the torch version."""
    if not native.available():
        return
    name, directory = native.build_dir(native._cflags())
    assert f"torch-{torch.__version__}" in str(directory)
    assert (directory / f"{name}.so").exists()
    done = _run("from fusedvlm import native; import sys; assert native.available(); print(native.status())")
    assert done.returncode == 0, done.stderr
    assert "building" not in done.stderr
