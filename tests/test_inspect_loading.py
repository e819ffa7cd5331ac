"""Checkpoint formats: every layout the issue names reads back the same tensors under the same names."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradscope.checkpoint import loading
from gradscope.checkpoint.loading import open_checkpoint, strip_prefixes
from gradscope.errors import CheckpointError

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run as fast on one thread, and on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in small_model().state_dict().items()}


def read_all(path, **kw) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path, **kw)
    return {e.name: t.clone() for e, t in ckpt.tensors()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_plain_state_dict(tmp_path, state):
    torch.save(state, tmp_path / "m.pt")
    ckpt = open_checkpoint(tmp_path / "m.pt")
    assert ckpt.format == "torch"
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert_same(read_all(tmp_path / "m.pt"), state)


@pytest.mark.parametrize("key", ["state_dict", "model", "module", "model_state_dict"])
def test_state_dict_nested_in_a_training_checkpoint(tmp_path, state, key):
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    # Lightning-style: weights next to optimizer states (tensors too!), counters and hyper-parameters.
    torch.save({key: state, "optimizer_states": [opt.state_dict()], "epoch": 4, "global_step": 120,
                "hyper_parameters": {"lr": 1e-3}}, tmp_path / "run.ckpt")
    ckpt = open_checkpoint(tmp_path / "run.ckpt")
    assert ckpt.meta["wrapper"] == key and ckpt.meta["epoch"] == 4 and ckpt.meta["global_step"] == 120
    assert_same(read_all(tmp_path / "run.ckpt"), state)


def test_optimizer_state_is_never_read_as_weights(tmp_path, state):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    torch.save({"net": state, "optimizer": opt.state_dict()}, tmp_path / "x.pt")
    names = [e.name for e in open_checkpoint(tmp_path / "x.pt").entries]
    assert names == [f"net.{k}" for k in state]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped_for_display(tmp_path, state, prefix):
    torch.save({prefix + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    ckpt = open_checkpoint(tmp_path / "ddp.pt")
    assert [e.name for e in ckpt.entries] == list(state)
    assert all(e.key.startswith(prefix) for e in ckpt.entries)


def test_prefix_stripping_keeps_real_names():
    # A real submodule called "module" next to others is a name, not a DDP wrapper.
    assert strip_prefixes(["module.w", "head.w"]) == {"module.w": "module.w", "head.w": "head.w"}
    assert strip_prefixes(["enc._orig_mod.fc.weight"]) == {"enc._orig_mod.fc.weight": "enc.fc.weight"}
    # Stripping that would merge two keys is not done at all.
    assert strip_prefixes(["_orig_mod.a", "a"]) == {"_orig_mod.a": "_orig_mod.a", "a": "a"}


def test_safetensors_file(tmp_path, state):
    safetensors_torch.save_file(state, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.format == "safetensors"
    assert {e.name: e.shape for e in ckpt.entries} == {k: tuple(v.shape) for k, v in state.items()}
    got = read_all(tmp_path / "m.safetensors")
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def write_shards(folder, state, kind: str) -> None:
    keys = list(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    ext, index = ("safetensors", "model.safetensors.index.json") if kind == "st" else \
        ("bin", "pytorch_model.bin.index.json")
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"model-{i:05d}-of-00002.{ext}"
        shard = {k: state[k].contiguous() for k in part}
        if kind == "st":
            safetensors_torch.save_file(shard, folder / name)
        else:
            torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_sharded_folder(tmp_path, state, kind):
    write_shards(tmp_path, state, kind)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == ("sharded safetensors" if kind == "st" else "sharded torch")
    got = read_all(tmp_path)
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_sharded_index_problems(tmp_path, state):
    write_shards(tmp_path, state, "st")
    index = tmp_path / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002\.safetensors listed in the index is missing"):
        open_checkpoint(tmp_path)
    doc["weight_map"]["0.weight"] = "../../etc/passwd"
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="is not a file in this folder"):
        open_checkpoint(tmp_path)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        open_checkpoint(tmp_path)


def test_single_file_hub_folder(tmp_path, state):
    safetensors_torch.save_file(state, tmp_path / "model.safetensors")
    assert sorted(read_all(tmp_path)) == sorted(state)


def test_legacy_torch_save_format(tmp_path, state):
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert_same(read_all(tmp_path / "old.pt"), state)


class Pickled(nn.Module):  # importable by the unpickler: a module-level class
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)


def test_full_model_pickle_only_with_trust(tmp_path):
    model = Pickled()
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match=r"would run code from the file .*Pickled"):
        open_checkpoint(tmp_path / "full.pt")
    ckpt = open_checkpoint(tmp_path / "full.pt", trust_pickle=True)
    assert ckpt.meta["wrapper"] == "pickled Pickled"
    assert_same(read_all(tmp_path / "full.pt", trust_pickle=True), model.state_dict())


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_reading_reopens_the_file_every_window_and_yields_every_tensor_once(tmp_path, monkeypatch, fmt):
    state = {f"blocks.{i}.weight": torch.randn(64, 64) for i in range(12)}
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        safetensors_torch.save_file(state, path)
    opened = []
    real_load, real_open = loading._torch_load, loading._safe_open
    monkeypatch.setattr(loading, "_torch_load", lambda *a: opened.append(1) or real_load(*a))
    monkeypatch.setattr(loading, "_safe_open", lambda *a: opened.append(1) or real_open(*a))
    ckpt = open_checkpoint(path)
    opened.clear()
    monkeypatch.setattr(loading, "WINDOW_BYTES", 3 * 64 * 64 * 4)  # three tensors per mapping
    got = {e.name: t.clone() for e, t in ckpt.tensors()}
    assert_same(got, state)
    assert len(opened) >= 3  # 12 tensors, 3 per window: the mapping was dropped and re-made
