"""Checkpoints under crashes and corruption.

``save_pretrained`` is killed (SIGKILL, in a forked child) at every step it takes: the
directory must then load as wholly the old checkpoint or wholly the new one, and the next
save must leave no temporary behind. Files and directories follow the user's umask.
Truncated or garbage weights and malformed configs are one-line errors naming the file."""

import json
import os
import shutil
import signal
import stat

import pytest
import torch

import fusedvlm.checkpoint as ckpt
from fusedvlm.config import FusionConfig
from fusedvlm.model.fusion_module import CONFIG_NAME, WEIGHTS_NAME, FusionModule, FusionModuleConfig

FUSION = FusionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, max_queries=31)


def make(seed, n_l) -> FusionModule:
    torch.manual_seed(seed)
    return FusionModule(FusionModuleConfig(fusion=FUSION, output_size=24, n_l=n_l)).eval()


OLD, NEW = make(0, 8), make(1, 16)


def _which(path) -> str:
    """'old' or 'new' when config and weights agree; anything else fails the test."""
    m = FusionModule.from_pretrained(path)
    for name, ref in (("old", OLD), ("new", NEW)):
        if m.cfg == ref.cfg:
            assert torch.equal(m.projection.weight, ref.projection.weight), f"{name} config beside other weights"
            return name
    raise AssertionError(f"unknown config {m.cfg}")


def _steps(monkeypatch, on_step):
    """Route every filesystem step of a save through ``on_step(label)``."""
    import safetensors.torch

    def wrap(obj, name):
        real = getattr(obj, name, None)
        if real is None:  # (the code before this fix has no such step)
            return

        def step(*a, **k):
            on_step(f"{name}:before")
            out = real(*a, **k)
            on_step(f"{name}:after")
            return out

        monkeypatch.setattr(obj, name, step)

    for obj, name in (
        (os, "rename"),
        (os, "replace"),
        (os, "mkdir"),
        (safetensors.torch, "save_file"),
        (json, "dump"),
        (ckpt, "_fsync"),
        (ckpt, "_exchange"),
        (shutil, "rmtree"),
    ):
        wrap(obj, name)


def _killed_save(monkeypatch, path, kill_at: int) -> bool:
    """Fork; the child saves NEW over ``path`` and SIGKILLs itself at step ``kill_at``.
    Returns True if the save finished before reaching that step."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            count = [0]

            def on_step(label):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            _steps(monkeypatch, on_step)
            NEW.save_pretrained(path)
            os._exit(0)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0
        return True
    assert os.WTERMSIG(status) == signal.SIGKILL
    return False


@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "new-dir"])
def test_save_pretrained_killed_at_every_step(tmp_path, monkeypatch, existing):
    finished, kill_at = False, 1
    while not finished:
        folder = tmp_path / f"kill-{kill_at}"
        folder.mkdir()
        path = folder / "fm"
        if existing:
            OLD.save_pretrained(path)
        finished = _killed_save(monkeypatch, path, kill_at)
        if os.path.exists(path):
            got = _which(path)
            assert got == "new" if finished else got in ("old", "new")
        else:
            assert not existing and not finished, "the directory vanished"
        # The next save cleans up whatever the killed one left, and succeeds.
        NEW.save_pretrained(path)
        assert sorted(os.listdir(folder)) == ["fm"], f"leftovers after a kill at step {kill_at}"
        assert _which(path) == "new"
        kill_at += 1
    assert kill_at > 8  # the save really has that many steps to be killed at


@pytest.mark.parametrize("step", ["save_file", "dump", "_fsync", "_exchange"])
def test_save_pretrained_failing_at_a_step_keeps_the_old_directory(tmp_path, monkeypatch, step):
    path = tmp_path / "fm"
    OLD.save_pretrained(path)

    def on_step(label):
        if label == f"{step}:before":
            raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        _steps(m, on_step)
        with pytest.raises(OSError, match="No space left"):
            NEW.save_pretrained(path)
    assert _which(path) == "old" and sorted(os.listdir(tmp_path)) == ["fm"]


def test_save_pretrained_keeps_other_files_of_the_directory(tmp_path):
    path = tmp_path / "fm"
    OLD.save_pretrained(path)
    (path / "README.md").write_text("my notes")
    NEW.save_pretrained(path)
    assert (path / "README.md").read_text() == "my notes" and _which(path) == "new"


def test_files_follow_the_umask(tmp_path, tiny_model):
    old = os.umask(0o022)
    try:
        OLD.save_pretrained(tmp_path / "fm")
        ckpt.save_trainable(tiny_model, str(tmp_path / "w.safetensors"))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "fm") == 0o755
    assert mode(tmp_path / "fm" / WEIGHTS_NAME) == 0o644 and mode(tmp_path / "fm" / CONFIG_NAME) == 0o644
    assert mode(tmp_path / "w.safetensors") == 0o644


def test_killed_single_file_save_is_cleaned_up(tmp_path, tiny_model):
    target = tmp_path / "w.safetensors"
    stale = tmp_path / ".w.safetensors.partial-999999999-0123abcd"  # a pid that cannot be alive
    stale.write_bytes(b"half a checkpoint")
    ckpt.save_trainable(tiny_model, str(target))
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]


# ------------------------------------------------------------------ corrupt files
def _saved(tmp_path):
    path = tmp_path / "fm"
    OLD.save_pretrained(path)
    return path


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_name_the_file(tmp_path, damage):
    path = _saved(tmp_path)
    w = path / WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(
        ValueError, match=rf"{WEIGHTS_NAME} is not a readable safetensors file \(truncated or corrupt\?\)"
    ):
        FusionModule.from_pretrained(path)


@pytest.mark.parametrize("text", ['{"format": "fusedvlm.FusionModule", "vers', "\xff\xfe garbage", "[1, 2]"])
def test_malformed_config_json_names_the_file(tmp_path, text):
    path = _saved(tmp_path)
    (path / CONFIG_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=CONFIG_NAME):
        FusionModule.from_pretrained(path)


def test_config_with_bad_fields_names_the_file(tmp_path):
    path = _saved(tmp_path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["config"]["n_l"] = "many"
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: bad config"):
        FusionModule.from_pretrained(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_trainable_checkpoint_names_the_file(tmp_path, tiny_model, damage):
    path = tmp_path / "w.safetensors"
    ckpt.save_trainable(tiny_model, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x00" * 64)
    for call in (ckpt.read_config, lambda p: ckpt.load_trainable(tiny_model, p)):
        with pytest.raises(ValueError, match=r"w.safetensors is not a readable safetensors file"):
            call(str(path))


def test_malformed_config_metadata_names_the_file(tmp_path, tiny_model):
    path = tmp_path / "w.safetensors"
    ckpt.atomic_save_safetensors(tiny_model.trainable_state_dict(), str(path), {ckpt.CONFIG_KEY: '{"vision": '})
    with pytest.raises(ValueError, match=r"w.safetensors: malformed fusedvlm config"):
        ckpt.read_config(str(path))


def test_save_pretrained_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    OLD.save_pretrained(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    NEW.save_pretrained(link)
    assert link.is_symlink() and _which(link) == "new" and _which(real) == "new"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


@pytest.mark.parametrize("text", ['{"family": "llava", "prom', '["llava"]'])
def test_malformed_adapter_json_names_the_file(tmp_path, text):
    from fusedvlm.adapters.llava import LlavaFusionAdapter
    from tests.test_adapter_llava import FUSION as ADAPTER_FUSION
    from tests.test_adapter_llava import N_L, tiny_llava

    host = tiny_llava()
    path = tmp_path / "fusion"
    LlavaFusionAdapter.attach(host, ADAPTER_FUSION, n_l=N_L).save_pretrained(path)
    assert sorted(os.listdir(path)) == ["adapter.json", CONFIG_NAME, WEIGHTS_NAME]
    (path / "adapter.json").write_text(text)
    with pytest.raises(ValueError, match=r"adapter.json is not (valid JSON|an adapter config)"):
        LlavaFusionAdapter.from_pretrained(tiny_llava(), path)
