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
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert "fusedvlm/kernels/__init__.py" in names and "fusedvlm/train/__init__.py" in names
    assert not any(n.startswith(("kernels/", "train/")) for n in names), "top-level kernels/ or train/ would shadow other packages"
    # The C++ sources ship, so an installed copy can build its CPU kernels.
    assert {"fusedvlm/csrc/packed_attention.cpp", "fusedvlm/csrc/common.h"} <= set(names)
    # The regular install imports from the wheel's files alone (run outside the repo).
    code = "import fusedvlm, fusedvlm.kernels, fusedvlm.train, fusedvlm.model; print(fusedvlm.__file__)"
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {code}"],
                         check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300).stdout
    assert out.strip().startswith(str(tmp_path / "site"))
    assert fusedvlm.__version__ in wheel
