from __future__ import annotations

import pytest
import torch

from mpq.evaluators.apply import apply_config
from mpq.evaluators.artifact import pack_state, unpack_state
from mpq.evaluators.proxy import output_agreement, reference_outputs
from mpq.evaluators.qat import (
    LsqRange,
    QatSettings,
    finetune,
    stage_configs,
    ste_weight,
)
from mpq.evaluators.quantize import fake_quantize_weight
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from tests.models import ConvNet, RecurrentPolicy, TiedLM, TinyTransformer, example_inputs

W2 = LayerChoice(w_bits=2, a_bits=8)  # per channel
G8 = LayerChoice(w_bits=2, a_bits=8, granularity="per_group", group_size=8)


def _batches(model: torch.nn.Module, n: int = 4) -> list[tuple[torch.Tensor, ...]]:
    torch.manual_seed(5)
    return [example_inputs(model, batch=8) for _ in range(n)]


def test_the_straight_through_gradient_is_the_identity() -> None:
    w = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 16)
    out = ste_weight(w, G8)
    assert torch.equal(out.detach(), fake_quantize_weight(w.detach(), 2, "per_group", 8, True))
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)  # round has no gradient; the estimator passes it on


def test_activation_quantization_passes_the_gradient_through() -> None:
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=32, a_bits=8))
    sim = apply_config(model, config, _batches(model), layers=layers)
    x = example_inputs(model)[0].requires_grad_(True)
    sim(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # without it: no gradient at all
    with torch.no_grad():  # the values are the simulated model's, unchanged
        assert torch.equal(sim(x), sim(x.detach()))


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_learned_range_starts_as_min_max_and_exports_by_the_formula(symmetric: bool) -> None:
    choice = G8.model_copy(update={"symmetric": symmetric, "w_bits": 3})
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    r = LsqRange(w, choice)
    formula = fake_quantize_weight(w, 3, "per_group", 8, symmetric)
    torch.testing.assert_close(r(w), formula, rtol=0, atol=1e-6)
    with torch.no_grad():  # narrow the learned range, as training would
        r.hi.mul_(0.6)
        if r.lo is not None:
            r.lo.mul_(0.6)
    trained = r(w).detach()
    clamped = w.clone()
    r.clamp_(clamped)
    # the clamped weight's min-max is the learned range: the notes' formula gives its codes
    exported = fake_quantize_weight(clamped, 3, "per_group", 8, symmetric)
    torch.testing.assert_close(exported, trained, rtol=0, atol=1e-6)
    assert not torch.allclose(exported, formula)


def test_progressive_stages_step_down_to_each_layers_width() -> None:
    layers = discover_layers(ConvNet())
    config = QuantConfig(
        layers={
            "conv1": W2,
            "conv2": W2.model_copy(update={"w_bits": 4}),
            "conv1d": LayerChoice(w_bits=8),
            "fc": LayerChoice(),
        }
    )
    config.check(layers)
    stages = stage_configs(config, progressive=True)
    assert [s.layers["conv1"].w_bits for s in stages] == [8, 6, 4, 3, 2]
    assert [s.layers["conv2"].w_bits for s in stages] == [8, 6, 4, 4, 4]
    assert {s.layers["fc"].w_bits for s in stages} == {32}
    assert stages[-1] == config
    assert stage_configs(config, progressive=False) == [config]
    five = QuantConfig(layers={**config.layers, "conv1": W2.model_copy(update={"w_bits": 5})})
    # a 5-bit layer trains at 8, then 6, then at its own 5 bits (the width it ships at)
    assert [s.layers["conv1"].w_bits for s in stage_configs(five, True)] == [8, 6, 5]


@pytest.mark.parametrize("model_cls", [ConvNet, RecurrentPolicy, TinyTransformer, TiedLM])
@pytest.mark.parametrize("lsq", [False, True])
def test_qat_recovers_what_2_bit_ptq_loses_and_exports_what_it_trained(
    model_cls: type[torch.nn.Module], lsq: bool
) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, W2)
    batches = _batches(model)
    ref = reference_outputs(model, batches)
    ptq = output_agreement(apply_config(model, config, batches, layers=layers), batches, ref)
    settings = QatSettings(
        steps=40, lr=3e-3, lsq=lsq, loss="mse" if model_cls is TinyTransformer else "kl"
    )
    result = finetune(model, layers, config, batches, settings)
    assert len(result.losses) == 40 and result.losses[-1] < result.losses[0]
    qat = apply_config(result.model, config, batches, layers=layers)
    if model_cls is not TinyTransformer:  # a regression output: agreement means nothing
        assert output_agreement(qat, batches, ref)["kl"] < ptq["kl"]
    # every trained weight, recurrent ones included, changed and still follows the formula:
    # the packed artifact's codes unpack to the simulated-quantized trained weights
    state = unpack_state(pack_state(result.model, layers, config), layers)
    for la in layers:  # a tied weight (TiedLM: embedding = output layer) trains once
        trained = dict(result.model.named_parameters())[f"{la.module}.{la.param}".lstrip(".")]
        original = dict(model.named_parameters())[f"{la.module}.{la.param}".lstrip(".")]
        assert not torch.equal(trained, original), la.name
        c = config.layers[la.name]
        expected = fake_quantize_weight(trained, c.w_bits, c.granularity, c.group_size, True)
        torch.testing.assert_close(state[f"{la.module}.{la.param}".lstrip(".")], expected)
    assert not any(p.requires_grad is False for p in result.model.parameters())
    for p in model.parameters():  # the float model is untouched
        assert p.grad is None


def test_a_step_that_returns_no_loss_or_nan_is_one_line() -> None:
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, W2)
    batches = _batches(model, 2)
    with pytest.raises(
        ValueError,
        match=r"^QAT step 0: the training step returned NoneType, not a scalar tensor$",
    ):
        finetune(model, layers, config, batches, QatSettings(steps=3), step=lambda m, b: None)
    with pytest.raises(ValueError, match=r"^QAT step 0: the training step is nan \(not finite\)$"):
        finetune(
            model,
            layers,
            config,
            batches,
            QatSettings(steps=3),
            step=lambda m, b: m(*b).sum() * float("nan"),
        )
    with pytest.raises(ValueError, match=r"^QAT: no batch to train on$"):
        finetune(model, layers, config, [], QatSettings(steps=3))
    half = QuantConfig.uniform(layers, LayerChoice(w_bits=16, a_bits=16))
    with pytest.raises(ValueError, match=r"^QAT: the configuration \(as it runs\) has no integer"):
        finetune(model, layers, half, batches, QatSettings(steps=3))


def test_a_user_step_trains_the_quantized_forward_pass() -> None:
    """Behaviour cloning on labels: the user's loss through ``student(*batch)``."""
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, W2)
    torch.manual_seed(1)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]

    def step(student: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(student(x), y)

    settings = QatSettings(steps=30, lr=1e-2)
    result = finetune(
        model, layers, config, data, settings, step=step, calibration=_batches(model, 1)
    )
    assert result.losses[-1] < result.losses[0]


def test_recorded_rollouts_join_the_data_and_the_float_model_labels_them() -> None:
    """On-policy distillation: the quantized shadow is handed to ``record`` at steps 0, 4 and
    8 of 12 (one Adam across them), and what it returns is trained on, labelled by the float
    model."""
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, W2)
    batches = _batches(model, 2)
    marker = torch.full_like(batches[0][0], 0.5)
    seen, calls, steps = [], [], []
    labelled = lambda m, args: seen.append(m is model and torch.equal(args[0], marker))  # noqa: E731
    model.register_forward_pre_hook(labelled)  # copies (shadow, student) carry it too

    def record(quantized: torch.nn.Module, round_: int) -> list[tuple[torch.Tensor, ...]]:
        calls.append((round_, len(steps)))
        ptq = apply_config(model, config, batches, layers=layers)
        x = batches[0][0]
        if round_ == 0:  # the shadow before any step: the post-training quantized model
            torch.testing.assert_close(quantized(x), ptq(x))
        return [(marker,)]

    settings = QatSettings(steps=12, lr=1e-2, record="tests:record", rounds=3)
    assert settings.record_steps() == [0, 4, 8]
    seen.clear()
    finetune(model, layers, config, batches, settings, on_step=lambda n, _: steps.append(n),
             record=record)  # fmt: skip
    assert calls == [(0, 0), (1, 4), (2, 8)]
    assert any(seen)  # the float model labelled a recorded batch


def test_recording_settings_and_an_empty_round_are_one_line() -> None:
    with pytest.raises(ValueError, match="qat.record and qat.rounds >= 1 go together"):
        QatSettings(record="m:f")
    with pytest.raises(ValueError, match="qat.record and qat.rounds >= 1 go together"):
        QatSettings(rounds=2)
    with pytest.raises(ValueError, match="qat.step replaces distillation: use one of them"):
        QatSettings(record="m:f", rounds=1, step="m:g")
    with pytest.raises(ValueError, match=r"qat.rounds \(5\) must not exceed qat.steps \(3\)"):
        QatSettings(steps=3, record="m:f", rounds=5)
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, W2)
    settings = QatSettings(steps=3, record="m:f", rounds=1)
    with pytest.raises(ValueError, match=r"^QAT: qat.record returned no batch in round 0$"):
        finetune(model, layers, config, _batches(model, 1), settings, record=lambda m, r: [])
    with pytest.raises(ValueError, match=r"^QAT: qat.rounds is set but no record function"):
        finetune(model, layers, config, _batches(model, 1), settings)
