"""Every torch.nn module class a small table can build runs forward and backward under watch(every=1) with
outputs and gradients bit-identical to the unwatched run, a batch of size 0 included where torch accepts
one, and leaves no hook behind after close(). Classes the table cannot build are listed with the reason."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import gradscope
from gradscope.errors import GradscopeWarning


@dataclass
class Case:
    make: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]  # batch size -> forward arguments
    zero_batch: bool = True  # try a batch of size 0 too (when torch itself accepts it)


def x(*shape: int) -> Callable[[int], tuple]:
    return lambda n: (torch.randn(n, *shape),)


def ints(high: int, *shape: int) -> Callable[[int], tuple]:
    return lambda n: (torch.randint(0, high, (n, *shape)),)


def pair(*shape: int) -> Callable[[int], tuple]:
    return lambda n: (torch.randn(n, *shape), torch.randn(n, *shape))


def _loss_cases() -> dict[str, Case]:
    def logits_targets(n: int) -> tuple:
        return torch.randn(n, 5), torch.randint(0, 5, (n,))

    def probs(n: int) -> tuple:
        return torch.rand(n, 4), torch.rand(n, 4)

    def signs(n: int) -> tuple:
        return torch.randn(n, 4), torch.randn(n, 4).sign()

    def ranking(n: int) -> tuple:
        return torch.randn(n), torch.randn(n), torch.randn(n).sign()

    def cosine(n: int) -> tuple:
        return torch.randn(n, 4), torch.randn(n, 4), torch.randn(n).sign()

    def multilabel(n: int) -> tuple:
        return torch.randn(n, 4), torch.tensor([[1, 3, -1, 0]] * n, dtype=torch.long).reshape(n, 4)

    def triplet(n: int) -> tuple:
        return torch.randn(n, 4), torch.randn(n, 4), torch.randn(n, 4)

    def gaussian(n: int) -> tuple:
        return torch.randn(n, 4), torch.randn(n, 4), torch.rand(n, 4) + 0.1

    def ctc(n: int) -> tuple:
        log_probs = torch.randn(12, n, 5).log_softmax(-1)
        targets = torch.randint(1, 5, (n, 4))
        return (
            log_probs,
            targets,
            torch.full((n,), 12, dtype=torch.long),
            torch.full((n,), 4, dtype=torch.long),
        )

    def nll2d(n: int) -> tuple:
        return torch.randn(n, 3, 4, 4).log_softmax(1), torch.randint(0, 3, (n, 4, 4))

    simple = ["L1Loss", "MSELoss", "HuberLoss", "SmoothL1Loss", "PoissonNLLLoss", "BCEWithLogitsLoss"]
    cases = {name: Case(getattr(nn, name), pair(4)) for name in simple}
    cases.update(
        CrossEntropyLoss=Case(nn.CrossEntropyLoss, logits_targets),
        NLLLoss=Case(nn.NLLLoss, lambda n: (torch.randn(n, 5).log_softmax(-1), torch.randint(0, 5, (n,)))),
        NLLLoss2d=Case(nn.NLLLoss2d, nll2d),
        MultiMarginLoss=Case(nn.MultiMarginLoss, logits_targets),
        BCELoss=Case(nn.BCELoss, probs),
        KLDivLoss=Case(lambda: nn.KLDivLoss(reduction="batchmean"), pair(4)),
        SoftMarginLoss=Case(nn.SoftMarginLoss, signs),
        HingeEmbeddingLoss=Case(nn.HingeEmbeddingLoss, signs),
        MultiLabelSoftMarginLoss=Case(nn.MultiLabelSoftMarginLoss, probs),
        MultiLabelMarginLoss=Case(nn.MultiLabelMarginLoss, multilabel),
        MarginRankingLoss=Case(nn.MarginRankingLoss, ranking),
        CosineEmbeddingLoss=Case(nn.CosineEmbeddingLoss, cosine),
        TripletMarginLoss=Case(nn.TripletMarginLoss, triplet),
        TripletMarginWithDistanceLoss=Case(nn.TripletMarginWithDistanceLoss, triplet),
        GaussianNLLLoss=Case(nn.GaussianNLLLoss, gaussian),
        CTCLoss=Case(nn.CTCLoss, ctc),
        CosineSimilarity=Case(nn.CosineSimilarity, pair(4)),
        PairwiseDistance=Case(nn.PairwiseDistance, pair(4)),
        AdaptiveLogSoftmaxWithLoss=Case(
            lambda: nn.AdaptiveLogSoftmaxWithLoss(8, 10, cutoffs=[4]),
            lambda n: (torch.randn(n, 8), torch.randint(0, 10, (n,))),
        ),
    )
    return cases


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for name in ["ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid",
                 "Tanh", "Hardtanh", "Hardsigmoid", "Hardswish", "Hardshrink", "Softshrink", "Tanhshrink",
                 "Softsign", "Softplus", "LogSigmoid", "RReLU", "Identity", "Dropout", "AlphaDropout",
                 "Flatten"]:  # fmt: skip
        cases[name] = Case(getattr(nn, name), x(8))
    for name in ["Softmax", "LogSoftmax", "Softmin", "GLU"]:
        cases[name] = Case(lambda name=name: getattr(nn, name)(dim=-1), x(8))
    cases["Threshold"] = Case(lambda: nn.Threshold(0.1, -1.0), x(8))
    cases["Softmax2d"] = Case(nn.Softmax2d, x(3, 4, 4))
    cases["Unflatten"] = Case(lambda: nn.Unflatten(1, (2, 4)), x(8))
    for d in (1, 2, 3):
        sp = (6,) * d
        cases[f"Dropout{d}d"] = Case(lambda d=d: getattr(nn, f"Dropout{d}d")(0.3), x(3, *sp))
        cases[f"Conv{d}d"] = Case(lambda d=d: getattr(nn, f"Conv{d}d")(3, 4, 3, padding=1), x(3, *sp))
        cases[f"ConvTranspose{d}d"] = Case(lambda d=d: getattr(nn, f"ConvTranspose{d}d")(3, 4, 2), x(3, *sp))
        cases[f"LazyConv{d}d"] = Case(
            lambda d=d: getattr(nn, f"LazyConv{d}d")(4, 3), x(3, *sp), zero_batch=False
        )
        cases[f"LazyConvTranspose{d}d"] = Case(
            lambda d=d: getattr(nn, f"LazyConvTranspose{d}d")(4, 2), x(3, *sp), zero_batch=False
        )
        for pool in ("MaxPool", "AvgPool"):
            cases[f"{pool}{d}d"] = Case(lambda d=d, pool=pool: getattr(nn, f"{pool}{d}d")(2), x(3, *sp))
        for pool in ("AdaptiveAvgPool", "AdaptiveMaxPool"):
            cases[f"{pool}{d}d"] = Case(lambda d=d, pool=pool: getattr(nn, f"{pool}{d}d")(2), x(3, *sp))
        cases[f"LPPool{d}d"] = Case(lambda d=d: getattr(nn, f"LPPool{d}d")(2, 2), x(3, *sp))
        cases[f"BatchNorm{d}d"] = Case(
            lambda d=d: getattr(nn, f"BatchNorm{d}d")(3), x(3, *sp), zero_batch=False
        )
        cases[f"LazyBatchNorm{d}d"] = Case(
            lambda d=d: getattr(nn, f"LazyBatchNorm{d}d")(), x(3, *sp), zero_batch=False
        )
        cases[f"InstanceNorm{d}d"] = Case(
            lambda d=d: getattr(nn, f"InstanceNorm{d}d")(3, affine=True), x(3, *sp)
        )
        cases[f"LazyInstanceNorm{d}d"] = Case(
            lambda d=d: getattr(nn, f"LazyInstanceNorm{d}d")(affine=True), x(3, *sp), zero_batch=False
        )
        for pad in ("ReflectionPad", "ReplicationPad", "ZeroPad", "CircularPad"):
            cases[f"{pad}{d}d"] = Case(lambda d=d, pad=pad: getattr(nn, f"{pad}{d}d")(1), x(3, *sp))
        cases[f"ConstantPad{d}d"] = Case(lambda d=d: getattr(nn, f"ConstantPad{d}d")(1, 0.5), x(3, *sp))
    for d in (1, 2, 3):
        pool = getattr(nn.functional, f"max_pool{d}d")
        cases[f"MaxUnpool{d}d"] = Case(
            lambda d=d: getattr(nn, f"MaxUnpool{d}d")(2),
            lambda n, d=d, pool=pool: pool(torch.randn(n, 3, *(6,) * d), 2, return_indices=True),
        )
    cases["FractionalMaxPool2d"] = Case(lambda: nn.FractionalMaxPool2d(2, output_size=3), x(3, 8, 8))
    cases["FractionalMaxPool3d"] = Case(lambda: nn.FractionalMaxPool3d(2, output_size=3), x(3, 8, 8, 8))
    cases["Linear"] = Case(lambda: nn.Linear(8, 4), x(8))
    cases["LazyLinear"] = Case(lambda: nn.LazyLinear(4), x(8), zero_batch=False)
    cases["Bilinear"] = Case(lambda: nn.Bilinear(8, 6, 4), lambda n: (torch.randn(n, 8), torch.randn(n, 6)))
    cases["LayerNorm"] = Case(lambda: nn.LayerNorm(8), x(5, 8))
    cases["RMSNorm"] = Case(lambda: nn.RMSNorm(8), x(5, 8))
    cases["GroupNorm"] = Case(lambda: nn.GroupNorm(2, 4), x(4, 6))
    cases["LocalResponseNorm"] = Case(lambda: nn.LocalResponseNorm(2), x(4, 6, 6))
    cases["CrossMapLRN2d"] = Case(lambda: nn.CrossMapLRN2d(3), x(4, 6, 6), zero_batch=False)
    cases["FeatureAlphaDropout"] = Case(lambda: nn.FeatureAlphaDropout(0.3), x(4, 6, 6))
    cases["Upsample"] = Case(lambda: nn.Upsample(scale_factor=2), x(3, 4, 4))
    cases["UpsamplingNearest2d"] = Case(lambda: nn.UpsamplingNearest2d(scale_factor=2), x(3, 4, 4))
    cases["UpsamplingBilinear2d"] = Case(lambda: nn.UpsamplingBilinear2d(scale_factor=2), x(3, 4, 4))
    cases["PixelShuffle"] = Case(lambda: nn.PixelShuffle(2), x(8, 3, 3))
    cases["PixelUnshuffle"] = Case(lambda: nn.PixelUnshuffle(2), x(2, 4, 4))
    cases["ChannelShuffle"] = Case(lambda: nn.ChannelShuffle(2), x(4, 3, 3))
    cases["Fold"] = Case(lambda: nn.Fold((4, 4), 2), x(3 * 4, 9))
    cases["Unfold"] = Case(lambda: nn.Unfold(2), x(3, 4, 4))
    for rnn in ("RNN", "LSTM", "GRU"):
        cases[rnn] = Case(lambda rnn=rnn: getattr(nn, rnn)(6, 5, num_layers=2, batch_first=True), x(4, 6))
        cases[f"{rnn}Cell"] = Case(lambda rnn=rnn: getattr(nn, f"{rnn}Cell")(6, 5), x(6))
    cases["Embedding"] = Case(lambda: nn.Embedding(10, 4), ints(10, 5))
    cases["EmbeddingBag"] = Case(lambda: nn.EmbeddingBag(10, 4), ints(10, 5))
    cases["MultiheadAttention"] = Case(
        lambda: nn.MultiheadAttention(8, 2, batch_first=True), lambda n: (torch.randn(n, 5, 8),) * 3
    )
    cases["TransformerEncoderLayer"] = Case(
        lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), x(5, 8), zero_batch=False
    )
    cases["TransformerDecoderLayer"] = Case(
        lambda: nn.TransformerDecoderLayer(8, 2, 16, batch_first=True), pair(5, 8), zero_batch=False
    )
    cases["TransformerEncoder"] = Case(
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False
        ),
        x(5, 8),
        zero_batch=False,
    )
    cases["TransformerDecoder"] = Case(
        lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True), 2),
        pair(5, 8),
        zero_batch=False,
    )
    cases["Transformer"] = Case(
        lambda: nn.Transformer(8, 2, 1, 1, 16, batch_first=True), pair(5, 8), zero_batch=False
    )
    cases["Sequential"] = Case(lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), x(8))
    cases.update(_loss_cases())
    return cases


# Classes the table leaves out on purpose, with why.
NOT_BUILT = {
    "Module": "abstract base class: no forward",
    "Container": "deprecated alias of Module: no forward",
    "ModuleList": "container without forward",
    "ModuleDict": "container without forward",
    "ParameterList": "container without forward",
    "ParameterDict": "container without forward",
    "RNNBase": "base class of RNN/LSTM/GRU (covered through them)",
    "RNNCellBase": "base class of the cells (covered through them)",
    "DataParallel": "a wrapper that watch() unwraps (covered in test_distributed)",
    "SyncBatchNorm": "training forward needs an initialized process group",
    "LinearCrossEntropyLoss": "new in this torch; its constructor and inputs are not in the table yet",
}

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks(model: nn.Module) -> list:
    out = [len(getattr(m, a, {}) or {}) for m in model.modules() for a in HOOK_DICTS]
    for p in model.parameters():
        out += [len(p._backward_hooks or {}), len(getattr(p, "_post_accumulate_grad_hooks", None) or {})]
    return out


def _float_tensors(obj) -> list[torch.Tensor]:
    from gradscope.hooks.outputs import iter_tensors

    return [t for t in iter_tensors(obj) if t.is_floating_point()]


def _run(case: Case, batch: int, watched: bool):
    torch.manual_seed(0)
    module = case.make()
    module.train()
    torch.manual_seed(1)
    args = case.inputs(batch)  # the first argument is the one differentiated (later ones: targets, memory)
    args = (args[0].requires_grad_() if args[0].is_floating_point() else args[0], *args[1:])
    scope = gradscope.watch(module, every=1) if watched else None
    torch.manual_seed(2)
    out = module(*args)
    outs = _float_tensors(out)
    loss = sum((o.float().sum() for o in outs if o.requires_grad), torch.zeros(()))
    if loss.requires_grad:
        loss.backward()
    if scope is not None:
        scope.step()
        scope.report()
        scope.close()
    grads = [p.grad for p in module.parameters()] + [a.grad for a in args if a.is_floating_point()]
    # compared with the unwatched run's (a lazy module removes its own initializing hook when it runs)
    return [o.detach() for o in outs], grads, _hooks(module)


def _identical(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for s, t in zip(a, b, strict=True):
        if (s is None) != (t is None):
            return False
        if s is not None and not (s.shape == t.shape and torch.equal(s.isnan(), t.isnan())):
            return False
        if s is not None and not torch.equal(s.nan_to_num(), t.nan_to_num()):  # an empty batch's mean is NaN
            return False
    return True


def test_every_buildable_torch_nn_module_runs_bit_identically_under_watch(capsys):
    classes = sorted(
        n for n in dir(nn) if isinstance(getattr(nn, n), type) and issubclass(getattr(nn, n), nn.Module)
    )
    cases = _cases()
    covered, skipped, zero_ok, failures, nondeterministic = [], {}, [], [], []
    for name in classes:
        if name not in cases:
            skipped[name] = NOT_BUILT.get(name, "not in the constructor table")
            continue
        case = cases[name]
        for batch in (3, 0) if case.zero_batch else (3,):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's own deprecation notes (NLLLoss2d, ...)
                    plain = _run(case, batch, watched=False)
                    again = _run(case, batch, watched=False)
            except Exception as exc:  # torch itself refuses this input (an empty batch): nothing to compare
                if batch == 3:
                    failures.append(f"{name}: the unwatched run failed: {exc!r}")
                continue
            deterministic = _identical(plain[0], again[0]) and _identical(plain[1], again[1])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    warnings.simplefilter("error", GradscopeWarning)  # gradscope must not fail quietly either
                    seen = _run(case, batch, watched=True)
            except Exception as exc:
                failures.append(f"{name} (batch {batch}): {exc!r}")
                continue
            if (
                not deterministic
            ):  # torch's own result varies run to run (an empty batch's uninitialized loss)
                nondeterministic.append(f"{name} (batch {batch})")
            elif not (_identical(plain[0], seen[0]) and _identical(plain[1], seen[1])):
                failures.append(f"{name} (batch {batch}): outputs or gradients differ under watch()")
            elif plain[2] != seen[2]:
                failures.append(f"{name} (batch {batch}): a hook was left after close()")
            elif batch == 0:
                zero_ok.append(name)
        covered.append(name)
    with capsys.disabled():
        print(f"\ntorch.nn fuzz: {len(covered)} classes covered ({len(zero_ok)} also with a batch of 0), "
              f"{len(skipped)} skipped:")  # fmt: skip
        for name, why in skipped.items():
            print(f"  {name}: {why}")
        if nondeterministic:
            print(
                "  not compared (torch's own output differs between two unwatched runs): "
                + ", ".join(nondeterministic)
            )
    assert not failures, "\n".join(failures)
    assert len(covered) >= 100
    assert not [n for n, why in skipped.items() if why == "not in the constructor table"]


@pytest.mark.parametrize("name", ["Linear", "Conv2d", "LSTM", "TransformerEncoderLayer", "Embedding"])
def test_watched_modules_are_measured_not_only_survived(name):
    case = _cases()[name]
    torch.manual_seed(0)
    module = case.make()
    with gradscope.watch(module, every=1) as scope:
        out = module(*case.inputs(3))
        sum(o.sum() for o in _float_tensors(out)).backward()
        scope.step()
    rec = scope.history.last
    assert rec.activations and rec.gradients
