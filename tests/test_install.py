"""kernels/ and train/ install inside our namespace, in editable and regular installs."""

import os
import subprocess
import sys
import zipfile

import fusedvlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_editable_install_maps_top_level_dirs_into_the_namespace():
    import fusedvlm.kernels
    import fusedvlm.train

    assert os.path.samefile(os.path.dirname(fusedvlm.kernels.__file__), os.path.join(ROOT, "kernels"))
    assert os.path.samefile(os.path.dirname(fusedvlm.train.__file__), os.path.join(ROOT, "train"))


def test_wheel_contains_kernels_and_train_under_fusedvlm(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert "fusedvlm/kernels/__init__.py" in names and "fusedvlm/train/__init__.py" in names
    assert not any(n.startswith(("kernels/", "train/")) for n in names), (
        "top-level kernels/ or train/ would shadow other packages"
    )
    # The C++ sources ship, so an installed copy can build its CPU kernels.
    assert {"fusedvlm/csrc/packed_attention.inc", "fusedvlm/csrc/variant_avx2.cpp", "fusedvlm/csrc/common.h"} <= set(
        names
    )
    # The regular install imports from the wheel's files alone (run outside the repo).
    code = "import fusedvlm, fusedvlm.kernels, fusedvlm.train, fusedvlm.model; print(fusedvlm.__file__)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {code}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    ).stdout
    assert out.strip().startswith(str(tmp_path / "site"))
    assert fusedvlm.__version__ in wheel


def test_config_imports_nothing_from_the_model():
    code = "import sys, fusedvlm.config; print(sorted(m for m in sys.modules if m.startswith('fusedvlm.') and m != 'fusedvlm.config'))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "[]"


def _import_graph() -> dict[str, set[str]]:
    """Every fusedvlm module -> the fusedvlm modules it imports anywhere (function-level
    imports included: a cycle held together by a late import is still a cycle)."""
    import ast

    dirs = {"fusedvlm": "fusedvlm", "fusedvlm.kernels": "kernels", "fusedvlm.train": "train"}
    files = {}
    for pkg, d in dirs.items():
        for folder, _, names in os.walk(os.path.join(ROOT, d)):
            for f in names:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), os.path.join(ROOT, d))[:-3].replace(os.sep, ".")
                    rel = rel.removesuffix("__init__").rstrip(".")
                    files[f"{pkg}.{rel}" if rel else pkg] = os.path.join(folder, f)
    graph = {}
    for mod, path in files.items():
        deps = set()
        with open(path) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps |= {n for n in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if n in files}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        graph[mod] = deps - {mod}
    return graph


def test_no_module_imports_in_a_cycle():
    graph = _import_graph()
    assert "fusedvlm.model.fusion_module" in graph["fusedvlm.model"]  # the walk sees the package
    cycles = []
    for start in graph:
        # Depth-first search for a path leading back to `start`.
        stack, seen = [(start, [start])], set()
        while stack:
            mod, path = stack.pop()
            for dep in graph[mod]:
                if dep == start:
                    cycles.append(" -> ".join(path + [start]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
            if cycles:
                break
    assert not cycles, f"import cycle: {cycles[0]}"


def test_production_code_imports_one_reference_only():
    """fusedvlm.ref is for tests and benchmarks, except the attention reference, which is also
    that op's torch path (design §10): one CPU attention implementation besides the C++ one."""
    graph = _import_graph()
    users = {
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if not mod.startswith("fusedvlm.ref")
        for dep in deps
        if dep.startswith("fusedvlm.ref")
    }
    allowed = {
        "fusedvlm.kernels.packed_attention -> fusedvlm.ref",
        "fusedvlm.kernels.packed_attention -> fusedvlm.ref.packed_attention",
    }
    assert users and users <= allowed, sorted(users)
