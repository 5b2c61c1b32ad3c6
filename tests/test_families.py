"""Model families users have, built from small configs (no downloads): what works so far.

GPT-2 (``transformers``): its ``Conv1D`` layers (transposed linears) become ``nn.Linear``
(exactly), so every weight matrix is in the space; a ``ModelOutput`` is read for its logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _bert() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    # the segment ids as an input, as users call BERT: left out, they are a constant that the
    # exporter folds together with the segment table (not the table that was sized)
    inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}
    return transformers.BertForSequenceClassification(config).eval(), inputs


def _vit() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config = transformers.ViTConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=5,
    )
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return transformers.ViTForImageClassification(config).eval(), {"pixel_values": x}


def _gpt2_keywords() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    # keyword inputs, the mask included: without it GPT-2 builds its mask with aten::diff,
    # which the ONNX exporter cannot trace
    return _gpt2(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _calibration(example: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    batch = {}
    for k, v in example.items():
        if v.is_floating_point():
            batch[k] = torch.randn((4, *v.shape[1:]), generator=g)
        elif k in ("attention_mask", "token_type_ids"):
            batch[k] = (torch.ones if k == "attention_mask" else torch.zeros)(
                (4, *v.shape[1:]), dtype=v.dtype
            )
        else:
            batch[k] = torch.randint(0, 100, (4, *v.shape[1:]), generator=g)
    return [batch]


def _mixed(layers: tuple) -> QuantConfig:  # type: ignore[type-arg]
    """Per kind, the kernels' formats in turn: 4-bit blocks with int8 inputs, 8-bit, 2-bit
    weight-only, float; static int8 for convolutions; 4-bit blocks for embeddings."""
    linear = [
        LayerChoice(w_bits=4, a_bits=8, granularity="per_group", group_size=32),
        LayerChoice(w_bits=8, a_bits=8),
        LayerChoice(w_bits=2, granularity="per_group", group_size=32),
        LayerChoice(),
    ]
    choices = {}
    for i, la in enumerate(layers):
        if la.kind == "embedding":
            choices[la.name] = LayerChoice(w_bits=4, granularity="per_group", group_size=16)
        elif la.kind.startswith("conv"):
            choices[la.name] = LayerChoice(w_bits=8, a_bits=8, act_mode="static")
        else:
            choices[la.name] = linear[i % len(linear)]
    return QuantConfig(layers=choices)


def _lowered_family(family: str) -> tuple[Any, ...]:
    from mpq.evaluators.backends import get_backend

    model, example = {"gpt2": _gpt2_keywords, "bert": _bert, "vit": _vit}[family]()
    model = linear_form(model)
    with torch.no_grad():  # trained-looking: the exporter stores identical tensors once (the
        for p in model.parameters():  # zero biases, the unit norms), the formula counts each
            p.normal_(0, 0.1)
    layers = discover_layers(model)
    cov = coverage(model, layers)
    # ViT's class token and position table are added to activations, not multiplied: no kernel
    assert {n.rsplit(".", 1)[-1] for n, _ in cov.uncovered} <= {"cls_token", "position_embeddings"}
    calibration = _calibration(example)
    lowered = get_backend("onnxruntime").lower(
        model, layers, _mixed(layers), example, 1, calibration=calibration
    )
    return model, example, layers, calibration, lowered


FAMILIES = ["gpt2", "bert", "vit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_transformer_family_lowers_on_onnxruntime_as_simulated(family: str) -> None:
    """The contract per family: discovery covers every weight matrix, a mixed configuration
    lowers with keyword inputs, no layer is "not found in the export" or silently float, and
    the lowered graph computes what the simulated model does."""
    import numpy as np

    model, example, layers, calibration, lowered = _lowered_family(family)
    assert not [n for n, why in lowered.fallbacks.items() if "not found" in why], lowered.fallbacks
    asked, ran = _mixed(layers), lowered.ran_config
    for la in layers:  # every layer ships at the bits asked, or says why not: none silently
        if ran.layers[la.name].w_bits != asked.layers[la.name].w_bits:  # left float
            assert la.tied and "shared with" in lowered.fallbacks[la.name], lowered.kernels
    simulated = apply_config(model, ran, calibration, layers=layers)
    with torch.no_grad():
        want = first_tensor(simulated(**example)).numpy()
    names = {i.name for i in lowered.module.get_inputs()}
    assert names <= set(example)  # the graph's inputs are named after the keywords
    got = lowered.module.run(None, {k: v.numpy() for k, v in example.items() if k in names})[0]
    assert float(np.abs(got - want).max()) <= 2e-3 * float(np.abs(want).max())


@pytest.mark.parametrize(
    "family",
    [
        "gpt2",  # its tied table ships once (the exporter's transposed copy is a Transpose)
        "bert",  # its position_ids and token_type_ids buffers are not persistent: not stored
        "vit",
    ],
)
def test_a_transformer_family_stores_the_formula_bytes(family: str) -> None:
    lowered = _lowered_family(family)[-1]
    assert lowered.stored_bytes == lowered.predicted_bytes
