"""What a new user meets on a fresh checkout: nothing in the checkout hides an installed
distribution, scripts start from the root, the public API imports lazily, the design document
the code cites is in the repository, and one-time work announces itself."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run_at_root(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _not_ours(path: str) -> bool:
    """``path`` is not a file of this checkout's top-level kernels/ (a venv may live inside the checkout)."""
    return os.path.realpath(os.path.dirname(path)) != os.path.realpath(os.path.join(ROOT, "kernels"))


def test_python_at_the_checkout_root_gets_the_installed_kernels_package():
    # `python -c` puts the checkout root first on sys.path, as an interactive shell does.
    code = (
        "import transformers.activations, fusedvlm.model, fusedvlm.kernels\n"
        "assert callable(fusedvlm.kernels.local_merge)\n"
        "try:\n"
        "    import kernels\n"
        "    print(kernels.__file__)\n"
        "except ModuleNotFoundError as e:\n"
        "    print('missing:', e)\n"
    )
    out = _run_at_root("-c", code)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    if _installed("kernels"):
        assert _not_ours(line), f"`import kernels` at the checkout root found {line}"
    else:
        assert line.startswith("missing:") and "fusedvlm.kernels" in line


def test_pytest_itself_sees_the_installed_kernels_package():
    # pytest put the checkout root on sys.path to import this package of tests.
    assert any(os.path.realpath(p or os.curdir) == os.path.realpath(ROOT) for p in sys.path)
    if not _installed("kernels"):
        pytest.skip("the PyPI package `kernels` is not installed (transformers < 5 does not need it)")
    import kernels

    assert _not_ours(kernels.__file__), kernels.__file__


def test_bare_train_is_not_our_training_package():
    out = _run_at_root("-c", "import train")
    assert out.returncode != 0 and "No module named 'train'" in out.stderr and "fusedvlm.train" in out.stderr


@pytest.mark.parametrize("script", ["bench/bench_decode.py", "tools/upstream_oracle.py"])
def test_scripts_start_from_the_checkout_root(script):
    out = _run_at_root(script, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr


def test_no_script_edits_sys_path_to_reach_the_checkout():
    offenders = []
    for folder in ("bench", "tools", "fusedvlm", "kernels", "train"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        text = f.read()
                    if re.search(r"sys\.path\.(insert|append)\(.*(__file__|ROOT)", text):
                        offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, offenders


def test_public_api_is_lazy():
    code = (
        "import sys, fusedvlm\n"
        "assert 'torch' not in sys.modules, 'import fusedvlm imported torch'\n"
        "from fusedvlm import FusedVLM, ChatSession, GenerationConfig, load_image, FusionModule\n"
        "print(FusedVLM.__module__, ChatSession.__module__, GenerationConfig.__module__, load_image.__module__,"
        " FusionModule.__module__)\n"
    )
    out = _run_at_root("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "fusedvlm.model.vlm",
        "fusedvlm.session",
        "fusedvlm.generation",
        "fusedvlm.preprocess",
        "fusedvlm.model.fusion_module",
    ]
    import fusedvlm

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        fusedvlm.NoSuchThing  # noqa: B018


def _tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [
        f
        for f in out.stdout.split("\n")
        if f.endswith((".py", ".md", ".cpp", ".h", ".toml", "Makefile")) and os.path.exists(os.path.join(ROOT, f))
    ]


def test_the_design_the_code_cites_is_in_the_repository():
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        sections = {int(n) for n in re.findall(r"^## (\d+)\.", f.read(), flags=re.M)}
    cited, outside = set(), []
    for rel in _tracked_text_files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        if re.search(r"\bSPEC\b|\.\./shared", text) and rel != "tests/test_fresh_checkout.py":
            outside.append(rel)
        for a, b in re.findall(r"design §(\d+)(?:-(\d+))?", text):
            cited |= set(range(int(a), int(b or a) + 1))
    assert not outside, f"cite docs/design.md, not a file outside the repository: {outside}"
    assert cited and cited <= sections, sorted(cited - sections)


def test_decode_compile_says_when_it_starts_and_ends(capsys):
    from fusedvlm.decode.engine import CompileStats, _first_calls

    class Engine:
        path, device, reason = "lean-compiled", "cpu", ""
        compile_stats, _seen = CompileStats(), set()

    _first_calls(Engine, (1, 256), lambda: None)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("[fusedvlm] compiling the lean-compiled decode step for batch 1, 256 cache positions")
    assert "cached under" in err[0] and re.fullmatch(r"\[fusedvlm\] decode step compiled in \d+\.\d s", err[1])


def test_chat_prints_no_deprecation_warning():
    warnings_as_errors = "-W error::FutureWarning -W error::DeprecationWarning".split()
    chat = "-m fusedvlm.cli chat --preset tiny --image sample:coffee --max-new-tokens 3 --decode hf".split()
    out = _run_at_root(*warnings_as_errors, *chat, "--question", "what is it?", "--question", "and the colour?")
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr and "deprecated" not in out.stderr.lower(), out.stderr


def test_build_command_without_compiling(capsys):
    from fusedvlm.cli import main

    assert main(["build", "--preset", "tiny", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "C++ CPU kernels:" in out and "nothing to compile" in out
