"""Model families users have, built from small configs (no downloads): what works so far.

GPT-2 (``transformers``): its ``Conv1D`` layers (transposed linears) become ``nn.Linear``
(exactly), so every weight matrix is in the space; a ``ModelOutput`` is read for its logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpq.evaluators.apply import apply_config
from mpq.evaluators.model import linear_form
from mpq.evaluators.proxy import first_tensor
from mpq.spaces.discover import coverage, discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig

transformers = pytest.importorskip("transformers")


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_are_linears_and_every_weight_matrix_is_covered() -> None:
    model = _gpt2()
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        before = model(x).logits
        linear_form(model)
        after = model(x).logits
    assert torch.equal(before, after)  # the same layer, written as nn.Linear
    layers = discover_layers(model)
    assert sum(la.kind == "linear" for la in layers) == 8  # c_attn, c_proj, c_fc, c_proj x 2
    cov = coverage(model, layers)
    assert cov.uncovered == ()  # every 2-D weight is in the space (the rest: norms, biases)
    assert cov.covered_params / cov.total_params > 0.95
    assert "lm_head.weight" in next(la for la in layers if la.name == "transformer.wte").tied


def test_gpt2_quantizes_and_its_output_is_read_for_logits() -> None:
    model = linear_form(_gpt2())
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=4, a_bits=8))
    x = torch.randint(0, 100, (2, 8))
    q = apply_config(model, config, [(x,)], layers=layers)
    with torch.no_grad():
        out, ref = first_tensor(q(x)), first_tensor(model(x))
    assert out.shape == ref.shape == (2, 8, 100)
    assert 0 < (out - ref).abs().max() < ref.abs().max()  # quantized, and still close


def test_a_mapping_without_logits_gives_its_first_tensor_and_none_is_one_line() -> None:
    t = torch.ones(2)
    assert first_tensor({"hidden": t, "n": 3}) is t
    with pytest.raises(ValueError, match="model output dict holds no tensor"):
        first_tensor({"n": 3})


class _ConvBnRelu(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _SmallCnn(torch.nn.Module):
    """torchvision's styles in small: conv-BN-ReLU stem, a depthwise-separable block, a
    residual block, a linear head (torchvision itself does not import beside the CPU torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _ConvBnRelu(3, 16, stride=2)
        self.dw = _ConvBnRelu(16, 16, groups=16)
        self.pw = torch.nn.Sequential(
            torch.nn.Conv2d(16, 32, 1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU()
        )
        self.res = _ConvBnRelu(32, 32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        x = x + self.res(x)
        return self.head(x.mean((2, 3)))


def test_a_cnn_with_batchnorm_is_folded_and_every_conv_runs_on_its_kernel() -> None:
    import numpy as np

    from mpq.evaluators.backends import get_backend
    from mpq.evaluators.model import fold_batchnorm

    torch.manual_seed(0)
    model = _SmallCnn().eval()
    for m in model.modules():  # trained-looking statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = folded(x)
    assert type(folded) is _SmallCnn  # the user's class and methods stay
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    layers = discover_layers(folded)
    assert coverage(folded, layers).uncovered == ()
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static"))
    lowered = get_backend("onnxruntime").lower(
        folded, layers, config, (x[:1],), 1, calibration=[(x,)]
    )
    convs = [la.name for la in layers if la.kind == "conv2d"]
    assert all(lowered.kernels[n].startswith("QLinearConv") for n in convs), lowered.kernels
    assert not any(n in lowered.fallbacks for n in convs)  # none "not found in the export"
    simulated = apply_config(folded, lowered.ran_config, [(x,)], layers=layers)
    with torch.no_grad():
        want = simulated(x[:1]).numpy()
    got = lowered.module.run(None, {"input_0": x[:1].numpy()})[0]
    assert float(np.abs(got - want).max()) <= 2e-3 * float(np.abs(want).max())


def test_a_checkpoint_of_the_folded_form_loads_and_a_reused_conv_is_not_folded(
    tmp_path: Path,
) -> None:
    """``finetuned.pt`` and exports hold the folded form: it loads back as a checkpoint. A
    convolution called twice (once without its BatchNorm) is left as it is."""
    from mpq.evaluators.model import build_model, fold_batchnorm

    torch.manual_seed(0)
    folded = fold_batchnorm(_SmallCnn().eval())
    path = tmp_path / "folded.pt"
    torch.save(folded.state_dict(), path)
    rebuilt = build_model("tests.test_families:_SmallCnn", path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), folded(x))

    class Reused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x)  # the conv twice

    model = Reused().eval()
    model.bn.running_mean.fill_(0.5)
    with torch.no_grad():
        before = model(x)
        after = fold_batchnorm(model)(x)
    assert isinstance(model.bn, torch.nn.BatchNorm2d)  # not folded
    torch.testing.assert_close(after, before)
