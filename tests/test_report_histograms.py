"""watch(histograms=True): activation and gradient histograms reach TensorBoard (read back from the events)."""

from __future__ import annotations

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradscope


def test_activation_and_gradient_histograms_are_written(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 8)
    outputs: dict[str, torch.Tensor] = {}
    model[0].register_forward_hook(lambda m, i, o: outputs.__setitem__("0", o.detach().clone()))
    with gradscope.watch(model, opt, log_dir=tmp_path, every=1, histograms=True) as scope:
        for _ in range(3):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    tags = set(events.Tags()["histograms"])
    for layer in ("0", "1", "2"):
        assert f"activations/{layer}" in tags, tags
        assert f"gradients/{layer}" in tags, tags
    hist = events.Histograms("activations/0")
    assert [h.step for h in hist] == [0, 1, 2]
    # The sampled values are the layer's real outputs: inside their range (measured in plain torch).
    last = outputs["0"]
    assert hist[-1].histogram_value.min >= float(last.min()) - 1e-6
    assert hist[-1].histogram_value.max <= float(last.max()) + 1e-6
    assert hist[-1].histogram_value.num > 0
