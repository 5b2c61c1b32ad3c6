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
from mpq.zoo import families
from mpq.zoo.families import SmallCnn

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


def test_a_cnn_with_batchnorm_is_folded_and_every_conv_runs_on_its_kernel() -> None:
    import numpy as np

    from mpq.evaluators.backends import get_backend
    from mpq.evaluators.model import fold_batchnorm

    torch.manual_seed(0)
    model = SmallCnn().eval()
    for m in model.modules():  # trained-looking statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = folded(x)
    assert type(folded) is SmallCnn  # the user's class and methods stay
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
    folded = fold_batchnorm(SmallCnn().eval())
    path = tmp_path / "folded.pt"
    torch.save(folded.state_dict(), path)
    rebuilt = build_model("tests.test_families:SmallCnn", path)
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


def _lowered_family(family: str) -> tuple[Any, ...]:
    from mpq.evaluators.backends import get_backend

    model, example, calibration = families.build(family)
    layers = discover_layers(model)
    cov = coverage(model, layers)
    # ViT's class token and position table are added to activations, not multiplied: no kernel
    assert {n.rsplit(".", 1)[-1] for n, _ in cov.uncovered} <= {"cls_token", "position_embeddings"}
    lowered = get_backend("onnxruntime").lower(
        model, layers, families.mixed(layers), example, 1, calibration=calibration
    )
    return model, example, layers, calibration, lowered


FAMILIES = ["gpt2", "bert", "vit", "cnn"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_lowers_on_onnxruntime_as_simulated(family: str) -> None:
    """The contract per family: discovery covers every weight matrix, a mixed configuration
    lowers with keyword inputs, no layer is "not found in the export" or silently float, and
    the lowered graph computes what the simulated model does."""
    import numpy as np

    model, example, layers, calibration, lowered = _lowered_family(family)
    assert not [n for n, why in lowered.fallbacks.items() if "not found" in why], lowered.fallbacks
    asked, ran = families.mixed(layers), lowered.ran_config
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
        "cnn",  # its BatchNorm folded first: the folded weights are what ship
    ],
)
def test_a_family_stores_the_formula_bytes(family: str) -> None:
    lowered = _lowered_family(family)[-1]
    assert lowered.stored_bytes == lowered.predicted_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_lowers_on_the_torch_backend_within_its_formats_tolerance(family: str) -> None:
    """The ``torch`` backend (torchao's kernels under Inductor; int4 with the notes' codes and
    bfloat16 activations): lowered == simulated within the per-format tolerance of the backend
    tests, stored bytes == formula, every layer not run as asked says why."""
    from mpq.evaluators.backends import get_backend
    from tests.evaluators.test_backends import tolerance

    model, example, calibration = families.build(family)
    layers = discover_layers(model)
    asked = families.mixed(layers)
    lowered = get_backend("torch").lower(model, layers, asked, example, 1, calibration)
    ran = lowered.ran_config
    for la in layers:
        if ran.layers[la.name] != asked.layers[la.name]:
            assert lowered.fallbacks.get(la.name), (la.name, lowered.kernels[la.name])
    simulated = apply_config(model, ran, calibration, layers=layers)
    with torch.no_grad():
        want = first_tensor(simulated(**example)).float()
        got = first_tensor(lowered.run()).float()
    narrowest = min(c.w_bits for c in ran.layers.values())
    tol = tolerance("torch", narrowest)
    assert float((got - want).abs().max()) <= tol * float(want.abs().max())
    assert lowered.stored_bytes == lowered.predicted_bytes


class _Looped(torch.nn.Module):
    """A denoising loop in small: the same convolution and linears run at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 4, 3, padding=1)
        self.cond = torch.nn.Linear(32, 4)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, 8)
        for _ in range(3):
            h = torch.relu(self.conv(x)) + self.cond(x.flatten(1))[:, :, None]
            x = x - 0.1 * self.out(h.flatten(1)).view_as(x)
        return x


def test_a_module_run_at_every_step_of_a_loop_ships_one_quantized_weight() -> None:
    """The exporter unrolls the loop: every node of a layer runs on its kernel, reading one
    int8 copy of the weight (stored bytes == formula), and the graph computes what the
    simulated model does."""
    import numpy as np
    import onnx

    from mpq.evaluators.backends import get_backend

    torch.manual_seed(0)
    model = _Looped().eval()
    x = torch.randn(1, 4, 8)
    calibration = [(torch.randn(8, 4, 8),)]
    layers = discover_layers(model)
    config = QuantConfig(
        layers={
            "conv": LayerChoice(w_bits=8, a_bits=8, act_mode="static"),
            "cond": LayerChoice(w_bits=4, granularity="per_group", group_size=16),
            "out": LayerChoice(w_bits=4, a_bits=8, granularity="per_group", group_size=32),
        }
    )
    lowered = get_backend("onnxruntime").lower(model, layers, config, (x,), 1, calibration)
    graph = onnx.load_from_string(lowered.artifact).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops  # out: every step
    float_convs = [n for n in graph.node if n.op_type == "Conv" and "conv.weight" in n.input]
    assert not float_convs and ops.count("QuantizeLinear") >= 6  # conv: every step, static
    assert len({i.name for i in graph.initializer}) == len(graph.initializer)
    assert lowered.stored_bytes == lowered.predicted_bytes
    simulated = apply_config(model, lowered.ran_config, calibration, layers=layers)
    with torch.no_grad():
        want = simulated(x).numpy()
    got = lowered.module.run(None, {"input_0": x.numpy()})[0]
    assert float(np.abs(got - want).max()) <= 2e-3 * float(np.abs(want).max())
