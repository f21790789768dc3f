"""The C++ CPU kernels: built lazily and cached, never at import; one warning and the torch
paths where they cannot be built."""

import os
import subprocess
import sys

import pytest
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
        "from fusedvlm import native\n"
        "from fusedvlm.backend import implementation\n"
        "from fusedvlm.packing import cu_seqlens_from_lengths\n"
        "from fusedvlm.ref.packed_attention import packed_attention as ref\n"
        "q = torch.randn(9, 2, 8); cu = cu_seqlens_from_lengths([4, 5])\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    outs = [packed_attention(q, q, q, cu) for _ in range(3)]\n"
        "    pairwise_cosine_stats(q[:, 0], q[:, 1], cu)\n"
        "    try:  # a direct call naming the C++ backend says why it is missing\n"
        "        torch.ops.fusedvlm.packed_attention(q, q, q, cu, cu, None, None, True, 0.3, 'cpp')\n"
        "        raise AssertionError('the cpp backend ran without a build')\n"
        "    except native.NativeUnavailable:\n"
        "        pass\n"
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
    """A second process finds the library built and loads it without running the build step
    (whose ninja commands name the venv, so another checkout's venv would rebuild the shared
    directory), keyed by the torch version."""
    if not native.available():
        pytest.skip(f"the C++ kernels are not built here: {native.status()}")
    name, directory = native.build_dir(native._cflags())
    assert f"torch-{torch.__version__}" in str(directory)
    assert (directory / f"{name}.so").exists() and (directory / native._COMPLETE).is_file()
    done = _run(
        "from torch.utils import cpp_extension\n"
        "def refuse(*a, **k): raise AssertionError('the build step ran for a complete build')\n"
        "cpp_extension.load = refuse\n"
        "from fusedvlm import native; assert native.available(), native.status(); print(native.status())"
    )
    assert done.returncode == 0, done.stderr
    assert "building" not in done.stderr


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_cpu_autograd_kernels_obey_the_callers_choice(monkeypatch):
    """Once the library is loaded, CPU calls enter its C++ autograd kernels (csrc/ops.cpp). The
    public function decides (fusedvlm.backend.implementation) and the op obeys its ``backend``
    argument: "cpp" runs C++ without entering Python, forward and backward; the torch path
    never reaches an op; "triton" reaches the Python kernel and the interpreter; anything else
    is refused by name."""
    import sys

    from fusedvlm.kernels import local_merge, packed_attention, pairwise_cosine_stats
    from fusedvlm.packing import cu_seqlens_from_lengths

    if not native.available():
        pytest.skip(f"the C++ kernels are not built here: {native.status()}")
    for op in ("packed_attention", "local_merge", "pairwise_cosine_stats"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedvlm::{op}", "AutogradCPU"), op
    modules = [sys.modules[f"fusedvlm.kernels.{m}"] for m in ("packed_attention", "pairwise_cosine", "local_merge")]
    entered = [_counting(monkeypatch, m, "kernel_backend") for m in modules]
    torch_paths = [_counting(monkeypatch, sys.modules["fusedvlm.ref.packed_attention"], "packed_attention")]
    torch_paths += [_counting(monkeypatch, modules[1], "_torch_pairwise_cosine_stats")]
    torch_paths += [_counting(monkeypatch, modules[2], "_torch_forward")]
    cu = cu_seqlens_from_lengths([3, 4])
    q = torch.randn(7, 2, 8, requires_grad=True)
    x = torch.randn(7, 16)
    w = torch.randn(16, 16, 3, 3)

    def calls():
        packed_attention(q, q, q, cu).sum().backward()
        pairwise_cosine_stats(x, x, cu)
        local_merge(x.view(1, 7, 16), w, x[0], grid=(7, 1))

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for choice, python in (("cpp", False), ("auto", False), ("torch", True)):
        monkeypatch.setenv("FUSEDVLM_BACKEND", choice)
        for counts in entered + torch_paths:
            counts.clear()
        calls()
        assert [len(c) for c in entered] == [0, 0, 0], choice
        assert [len(c) for c in torch_paths] == ([1, 1, 1] if python else [0, 0, 0]), choice
    for bad in ("torch", "bogus"):
        with pytest.raises(ValueError, match=f"backend '{bad}' cannot run on cpu tensors; choose from cpp, triton"):
            torch.ops.fusedvlm.packed_attention(q, q, q, cu, cu, None, None, True, 0.3, bad)
    monkeypatch.setenv("FUSEDVLM_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = _counting(monkeypatch, modules[0], "_triton_forward")
    if __import__("fusedvlm.backend").backend.triton_available():
        packed_attention(q.detach(), q.detach(), q.detach(), cu)
        assert triton == ["_triton_forward"]


def test_flops_of_the_cpp_route_are_counted_forward_and_backward():
    """FlopCounterMode (a Python mode) sees the op and its backward on the C++ route too."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusedvlm.kernels import packed_attention
    from fusedvlm.kernels.packed_attention import packed_attention_flops
    from fusedvlm.packing import cu_seqlens_from_lengths

    cu = cu_seqlens_from_lengths([5, 2, 9])
    q = torch.randn(16, 2, 8, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        packed_attention(q, q, q, cu).sum().backward()
    forward = packed_attention_flops(cu.tolist(), cu.tolist(), 2, 8)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts == {"fusedvlm.packed_attention": forward, "fusedvlm.packed_attention_backward": 2 * forward}
