"""`gradscope inspect --model` on a Hugging Face `save_pretrained` folder with tied weights: the keys the
model ties to a loaded parameter are not missing, the view says which were tied, and every finding of an
inspection (the probe's too) carries step None."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from gradscope_cli.main import cli  # noqa: E402

BUILD = '''
from transformers import GPT2Config, GPT2LMHeadModel

def build():
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)
'''


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tiny_gpt2.py").write_text(BUILD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from tiny_gpt2 import build  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = build()
    assert model.lm_head.weight is model.transformer.wte.weight  # really tied
    model.save_pretrained(tmp_path / "ckpt")
    with safetensors.safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # left out of the file
    return tmp_path / "ckpt"


def test_tied_keys_are_not_missing_and_are_named(folder: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(folder), "--model", "tiny_gpt2:build", "--input-shape", "2,8"])
    assert result.exit_code in (0, 1), result.output
    words = " ".join(result.output.replace("│", " ").split())  # the panel wraps at 80 columns
    assert "missing keys" not in words
    assert "tied lm_head.weight = transformer.wte.weight" in words
    assert "probe: 3 forward/backward passes" in words


def test_inspection_findings_carry_no_step(folder: Path) -> None:
    # Weights scaled 1e4 give the probe (and the weight rules) something to find.
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    weights["transformer.wte.weight"] = weights["transformer.wte.weight"] * 1e4
    weights["transformer.h.0.mlp.c_fc.weight"] = weights["transformer.h.0.mlp.c_fc.weight"] * 1e4
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["inspect", str(folder), "--model", "tiny_gpt2:build", "--input-shape", "2,8",
                                      "--json"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.output)
    probe_kinds = {"vanishing_gradient", "exploding_gradient"}  # gradient flow: only the probe finds these
    assert any(f["kind"] in probe_kinds for f in report["findings"]), report["findings"]
    assert all(f["step"] is None for f in report["findings"])
