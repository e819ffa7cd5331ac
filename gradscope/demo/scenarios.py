"""The demo's scenarios: a healthy control and one model per problem, each with the finding it shows.

Every scenario trains in a few seconds on a CPU, downloads nothing, and is built so that its fault is
physically real (the gradient really vanishes, the units really are dead), not simulated.
``Scenario.expect`` names the finding (kind, layer) it demonstrates; the healthy control expects nothing
of severity warning or above. (The tests add more healthy controls in tests/zoo.py.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import SyntheticData, classification, regression
from .models import Exp, UnusedBranch, kaiming, relu_mlp
from .training import Scenario


def healthy_mlp(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = relu_mlp(dropout=0.1)
    return Scenario(
        "healthy_mlp", "ReLU MLP with Kaiming init, dropout and Adam: nothing to find.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), classification(seed=seed), steps=120,
    )




def vanishing_sigmoid(seed: int = 0, depth: int = 12) -> Scenario:
    """Default init + sigmoid: each layer multiplies the gradient by ~0.25 x 0.58, so ~1e-10 after 12."""
    torch.manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(depth):
        layers[f"fc{i}"], layers[f"sig{i}"] = nn.Linear(32, 32), nn.Sigmoid()
    layers["head"] = nn.Linear(32, 4)
    model = nn.Sequential(layers)
    return Scenario(
        "vanishing_sigmoid", f"A {depth}-layer sigmoid MLP trained with SGD: the first layers get no gradient.",
        model, torch.optim.SGD(model.parameters(), lr=0.1), classification(seed=seed), steps=60,
        expect=("vanishing_gradient", "fc0"),
    )


def dead_relu(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = relu_mlp(width=64)
    with torch.no_grad():
        model.fc2.bias.fill_(-10.0)  # pre-activations ~N(-10, 1): every unit of act2 is off, for good
    return Scenario(
        "dead_relu", "A ReLU layer whose bias is -10: all its units output zero and never recover.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), classification(seed=seed), steps=60,
        expect=("dead_relu", "act2"),
    )


def exploding_lr(seed: int = 0, at: int | None = 40) -> Scenario:
    """SGD on a regression whose lr goes up 100-fold at step ``at`` (``at=None``: never, the control)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(16, 64), act1=nn.LeakyReLU(0.2), fc2=nn.Linear(64, 64), act2=nn.LeakyReLU(0.2),
            head=nn.Linear(64, 1),
        )
    )
    steps = (40 if at is None else at) + 20
    return Scenario(
        "exploding_lr", f"Regression with SGD whose learning rate is raised 100-fold at step {at}: it diverges.",
        model, torch.optim.SGD(model.parameters(), lr=0.01), regression(seed=seed), steps=steps,
        loss_fn=F.mse_loss, lr_at=None if at is None else (lambda s: 1.0 if s < at else 100.0),
        expect=None if at is None else ("exploding_gradient", "fc1"),
    )


def bn_eval_shift(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = kaiming(
        nn.Sequential(
            OrderedDict(
                bn0=nn.BatchNorm1d(32), fc1=nn.Linear(32, 64), act1=nn.ReLU(), head=nn.Linear(64, 4),
            )
        )
    )
    train_data = classification(seed=seed)
    raw = classification(seed=seed + 1)
    # The eval pipeline forgot to standardize: features arrive with mean 5 and std 20.
    eval_data = SyntheticData(raw.x * 20 + 5, raw.y, raw.batch_size)
    return Scenario(
        "bn_eval_shift", "BatchNorm whose eval inputs were not standardized like the training inputs.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), train_data, steps=60,
        eval_data=eval_data, eval_every=10, expect=("normalization_drift", "bn0"),
    )


def nan_source(seed: int = 0, at: int = 25) -> Scenario:
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(32, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 32), exp=Exp(), head=nn.Linear(32, 4),
        )
    )
    data = classification(seed=seed)
    data.x[at * data.batch_size % data.x.shape[0]] *= 1e4  # one corrupt sample, first served at step `at`
    return Scenario(
        "nan_source", f"exp() of a corrupt sample overflows at step {at}; every later layer inherits the inf/NaN.",
        model, torch.optim.SGD(model.parameters(), lr=0.01), data, steps=at + 10,
        expect=("nonfinite", "exp"),
    )


def not_in_optimizer(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = relu_mlp(width=64)
    params = [*model.fc1.parameters(), *model.head.parameters()]  # fc2 forgotten
    return Scenario(
        "not_in_optimizer", "fc2 was left out of the optimizer: it gets gradients but never trains.",
        model, torch.optim.Adam(params, lr=1e-3), classification(seed=seed), steps=40,
        expect=("not_in_optimizer", "fc2"),
    )


def unused_parameter(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = UnusedBranch()
    params = [p for p in model.parameters() if p.requires_grad]
    return Scenario(
        "unused_parameter", "An aux head defined but never called (and a frozen stem, which is fine).",
        model, torch.optim.Adam(params, lr=1e-3), classification(seed=seed), steps=40,
        expect=("unused_parameter", "aux"),
    )


def saturated_tanh(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = kaiming(
        nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(32, 64), act1=nn.Tanh(), fc2=nn.Linear(64, 64), act2=nn.ReLU(),
                head=nn.Linear(64, 4),
            )
        )
    )
    with torch.no_grad():
        model.fc1.weight.normal_(0.0, 30 / math.sqrt(32))  # pre-activations ~N(0, 30^2): tanh pinned at +/-1
    return Scenario(
        "saturated_tanh", "tanh behind a layer initialized 30x too large: its outputs sit at +/-1.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), classification(seed=seed), steps=60,
        expect=("saturated_activation", "act1"),
    )


#: Every scenario of the demo, by name, in the order shown: the healthy control first.
SCENARIOS: dict[str, Callable[..., Scenario]] = {
    f.__name__: f
    for f in (
        healthy_mlp, vanishing_sigmoid, dead_relu, exploding_lr, bn_eval_shift, nan_source, not_in_optimizer,
        saturated_tanh, unused_parameter,
    )
}


def build(name: str, seed: int = 0) -> Scenario:
    """A fresh, seeded scenario by name (see ``SCENARIOS``)."""
    try:
        return SCENARIOS[name](seed)
    except KeyError:
        raise KeyError(f"no demo scenario {name!r}; choose one of {', '.join(SCENARIOS)}") from None
