"""The probe: --model MODULE:CALLABLE from the current directory, strict loading, synthetic input, and the
gradient-flow findings of the watched passes."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradscope
from gradscope.checkpoint import probe
from gradscope.errors import UsageError
from gradscope_cli.main import cli


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run as fast on one thread, and on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODELS = '''
import torch
from torch import nn


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(16, 4)
        self.unused = nn.Linear(16, 4)  # never called in forward

    def forward(self, x):
        return self.used(x)


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.fc = nn.Linear(16, 100)

    def forward(self, x):
        assert x.dtype == torch.long and int(x.max()) < 100
        return self.fc(self.emb(x))


def not_a_model():
    return 42
'''

_names = itertools.count()


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A models module in the current directory, under a fresh name (import caches are per process)."""
    name = f"gs_probe_models_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def build(models: str, attr: str) -> nn.Module:
    return probe.resolve_model(f"{models}:{attr}")


def inspect(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args], terminal_width=120)


def test_dead_layer_is_found_by_weights_and_by_the_probe(models, tmp_path):
    state = build(models, "mlp").state_dict()
    state["2.bias"].fill_(-100.0)  # every unit of layer 2 is pushed far below zero
    torch.save(state, tmp_path / "dead.pt")
    result = inspect("dead.pt", "--model", f"{models}:mlp", "--input-shape", "64,16", "--json")
    assert result.exit_code == 1, result.stderr
    doc = json.loads(result.stdout)
    found = {(f["kind"], f["layer"]): f for f in doc["findings"]}
    assert found[("dead_relu", "2")]["step"] is None  # proven from the weights alone
    assert found[("dead_relu", "3")]["severity"] == "critical"  # the ReLU after it, seen in the probe
    assert found[("dead_relu", "3")]["step"] is None  # a checkpoint has no training step, nor has its probe
    assert doc["steps"] == gradscope.Thresholds().min_steps
    layer = doc["layers"]["2"]
    assert "tensors" in layer and layer["type"] == "Linear"  # weight rows and probe statistics side by side
    assert list(doc["layers"]) == [n for n, _ in build(models, "mlp").named_modules() if n in doc["layers"]]


def test_unused_branch_is_found_by_the_probe(models, tmp_path):
    torch.save(build(models, "Branchy").state_dict(), tmp_path / "b.pt")
    report = gradscope.inspect_checkpoint(tmp_path / "b.pt", model=f"{models}:Branchy", input_shape="8,16")
    assert [(f.kind, f.layer) for f in report.findings] == [("unused_parameter", "unused")]


def test_embedding_models_get_token_ids(models, tmp_path):
    torch.save(build(models, "LM").state_dict(), tmp_path / "lm.pt")
    result = inspect("lm.pt", "--model", f"{models}:LM", "--input-shape", "4,12")
    assert result.exit_code == 0, result.stderr
    assert "probe: 3 forward/backward passes" in result.stdout
    result = inspect("lm.pt", "--model", f"{models}:LM", "--input-shape", "4,12", "--input-dtype", "long",
                     "--vocab", "50")
    assert result.exit_code == 0, result.stderr


def test_mismatched_model_lists_missing_and_unexpected_keys(models, tmp_path):
    state = build(models, "mlp").state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["4.bias"]
    torch.save(state, tmp_path / "m.pt")
    result = inspect("m.pt", "--model", f"{models}:mlp", "--input-shape", "8,16")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "does not match the model" in line
    assert "missing keys: 4.bias" in line and "unexpected keys: extra.weight" in line


def test_ddp_prefixed_checkpoint_loads_into_the_plain_model(models, tmp_path):
    state = {f"module.{k}": v for k, v in build(models, "mlp").state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    report = gradscope.inspect_checkpoint(tmp_path / "ddp.pt", model=f"{models}:mlp", input_shape=(8, 16))
    assert report.steps > 0 and "0" in report.layers


@pytest.mark.parametrize(("spec", "phrase"), [
    ("nocolon", "must be MODULE:CALLABLE"),
    ("no_such_module_xyz:build", "cannot import no_such_module_xyz"),
    ("{models}:missing", "has no attribute missing"),
    ("{models}:not_a_model", "returned a int, not a torch.nn.Module"),
])
def test_bad_model_specs(models, tmp_path, spec, phrase):
    torch.save({"w": torch.zeros(2)}, tmp_path / "m.pt")
    result = inspect("m.pt", "--model", spec.format(models=models), "--input-shape", "2,16")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert phrase in line


def test_forward_failure_is_a_usage_error(models, tmp_path):
    torch.save(build(models, "mlp").state_dict(), tmp_path / "m.pt")
    result = inspect("m.pt", "--model", f"{models}:mlp", "--input-shape", "8,15")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "probe pass failed on synthetic input of shape [8, 15]" in line


def test_probe_leaves_the_global_rng_alone(models, tmp_path):
    torch.save(build(models, "mlp").state_dict(), tmp_path / "m.pt")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gradscope.inspect_checkpoint(tmp_path / "m.pt", model=f"{models}:mlp", input_shape="4,16")
    assert torch.equal(torch.rand(3), expected)


def test_shape_parsing():
    assert probe.parse_shape("8,3,32,32") == (8, 3, 32, 32)
    for bad in ("", "8,,3", "8,-1", "a,b"):
        with pytest.raises(UsageError, match="--input-shape"):
            probe.parse_shape(bad)


def test_synthetic_loss_reaches_tensors_inside_structures():
    a = torch.ones(2, requires_grad=True)
    b = torch.full((3,), 2.0, requires_grad=True)
    loss = probe.synthetic_loss({"logits": a * 1, "aux": [b * 1, "text"], "frozen": torch.ones(4)})
    assert float(loss.detach()) == pytest.approx(0.5 * (1.0 + 4.0))
    with pytest.raises(UsageError, match="no floating tensor that requires grad"):
        probe.synthetic_loss(torch.ones(3))
