from __future__ import annotations

import copy

import pytest
import torch

from mpq.evaluators.apply import _OutProjCalled, apply_config
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from tests.models import ALL_MODELS, ConvNet, Stacked, TiedLM, TinyTransformer, example_inputs


@pytest.mark.parametrize("model_cls", ALL_MODELS)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_apply_leaves_original_untouched_and_tracks_bits(model_cls: type, mode: str) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = example_inputs(model)
    ref = model(*x)
    layers = discover_layers(model)
    errors = {}
    for bits in (8, 4, 2):
        config = QuantConfig.uniform(layers, LayerChoice(w_bits=bits, a_bits=8, act_mode=mode))
        q = apply_config(model, config, calibration=[x])
        errors[bits] = float((q(*x) - ref).abs().mean())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.05 * float(ref.abs().mean()) + 1e-3


def test_keep_config_is_identity() -> None:
    model = TinyTransformer().eval()
    x = example_inputs(model)
    layers = discover_layers(model)
    q = apply_config(model, QuantConfig.uniform(layers, LayerChoice()))
    assert torch.equal(q(*x), model(*x))


def test_static_activations_need_calibration() -> None:
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static"))
    with pytest.raises(ValueError, match="static activations need calibration data"):
        apply_config(model, config)
    with pytest.raises(ValueError, match="calibration data is empty"):
        apply_config(model, config, calibration=[])
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="calibration batch 0 input 0: 1 NaN/Inf"):
        apply_config(model, config, calibration=[(bad,)])


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_observers(observer: str) -> None:
    model = ConvNet().eval()
    x = example_inputs(model, batch=8)
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static"))
    q = apply_config(model, config, calibration=[x], observer=observer)
    assert torch.allclose(q(*x), model(*x), atol=0.05)


def test_unknown_observer() -> None:
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static"))
    with pytest.raises(
        ValueError, match=r"observer='kl' not in \['minmax', 'mse', 'percentile'\]"
    ):
        apply_config(model, config, calibration=[example_inputs(model)], observer="kl")


def test_tied_weights_stay_tied() -> None:
    model = TiedLM().eval()
    layers = discover_layers(model)
    q = apply_config(model, QuantConfig.uniform(layers, LayerChoice(w_bits=4)))
    assert q.out.weight is q.embed.weight
    assert not torch.equal(q.embed.weight, model.embed.weight)


def test_config_that_does_not_fit_is_refused() -> None:
    model = ConvNet().eval()
    with pytest.raises(ValueError, match="does not cover layers"):
        apply_config(model, QuantConfig(layers={"fc": LayerChoice(w_bits=4)}))


@pytest.mark.parametrize("model_cls", [*ALL_MODELS, Stacked])
def test_every_activation_choice_changes_the_output(model_cls: type) -> None:
    """Each layer's a_bits=8 alone changes the simulated output: a hook that never fires (the
    out_proj that nn.MultiheadAttention multiplies by itself) is caught for every layer kind."""
    torch.manual_seed(0)
    model = model_cls().eval()
    x = example_inputs(model)
    layers = discover_layers(model)
    keep = QuantConfig.uniform(layers, LayerChoice())
    ref = apply_config(model, keep, [x], layers=layers)(*x)
    for la in layers:
        if not la.takes_activations or la.param.startswith("weight_hh"):
            continue  # (RecurrentPolicy passes no state: weight_hh multiplies zeros there)
        choices = dict(keep.layers) | {la.name: LayerChoice(a_bits=8)}
        out = apply_config(model, QuantConfig(layers=choices), [x], layers=layers)(*x)
        assert not torch.equal(out, ref), la.name


@pytest.mark.parametrize("batch_first", [True, False])
def test_rerouted_attention_is_exact_in_float(batch_first: bool) -> None:
    """Attention rerouted to call out_proj (an identity projection inside, then out_proj as a
    module) gives the float attention bit for bit, and its out_proj hooks run."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    rerouted = copy.deepcopy(attn)
    rerouted.__class__ = _OutProjCalled
    calls = []
    rerouted.out_proj.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    q, kv = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    for need_weights in (False, True):
        with torch.inference_mode():
            want = attn(q, kv, kv, need_weights=need_weights)
            got = rerouted(q, kv, kv, need_weights=need_weights)
        assert torch.equal(got[0], want[0])
        assert (got[1] is None) == (want[1] is None)
    assert len(calls) == 2


class _ReadsWeight(torch.nn.Module):
    """Uses ``inner.weight`` without calling ``inner``: an activation choice can't apply."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.inner.weight)


def test_activation_of_a_module_never_called_is_an_error() -> None:
    model = _ReadsWeight().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(a_bits=8))
    with pytest.raises(
        ValueError,
        match=r"layer 'inner': its module is never called through forward on the "
        r"calibration data .* give it a_bits: 32",
    ):
        apply_config(model, config, calibration=[(torch.randn(2, 4),)])


@pytest.mark.parametrize("model_cls", [*ALL_MODELS, Stacked])
def test_batched_equals_batch_one(model_cls: type) -> None:
    """Dynamic per-tensor ranges are per sample: a batch of N gives the N batch-1 outputs."""
    torch.manual_seed(0)
    model = model_cls().eval()
    x = example_inputs(model, batch=4)
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=4, a_bits=8))
    q = apply_config(model, config, [x], layers=layers)
    with torch.inference_mode():
        batched = q(*x)
        single = torch.cat([q(*(t[i : i + 1] for t in x)) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_recurrent_state_activations_are_quantized() -> None:
    """weight_hh's input is the state passed in: a GRU's h, an LSTM's h of (h, c)."""
    torch.manual_seed(0)
    for rnn in (torch.nn.GRU(8, 16, batch_first=True), torch.nn.LSTM(8, 16, batch_first=True)):
        rnn = rnn.eval()
        layers = discover_layers(rnn)
        x = torch.randn(3, 1, 8)
        h = torch.randn(1, 3, 16)
        state = h if isinstance(rnn, torch.nn.GRU) else (h, torch.randn(1, 3, 16))
        choices = {la.name: LayerChoice() for la in layers}
        choices["weight_hh_l0"] = LayerChoice(a_bits=8)
        q = apply_config(rnn, QuantConfig(layers=choices), [(x, state)], layers=layers)
        assert not torch.equal(q(x, state)[0], rnn(x, state)[0]), type(rnn).__name__


@pytest.mark.parametrize("batch_first", [True, False])
def test_rerouted_out_proj_ranges_are_per_sample_in_either_layout(batch_first: bool) -> None:
    """A sequence-first attention hands out_proj (L, B, E): its ranges are still per sample."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
    layers = discover_layers(attn)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=4, a_bits=8))
    x = torch.randn(3, 5, 16)  # 3 samples of 5 tokens
    x[1] *= 20  # one sample with a much wider range must not coarsen the others'
    seq = x if batch_first else x.transpose(0, 1)
    q = apply_config(attn, config, [(seq, seq, seq)], layers=layers)
    with torch.inference_mode():
        batched = q(seq, seq, seq, need_weights=False)[0]
        axis = 0 if batch_first else 1
        single = torch.cat(
            [q(*(seq.narrow(axis, i, 1),) * 3, need_weights=False)[0] for i in range(3)],
            dim=axis,
        )
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_a_static_int8_conv_adds_its_bias_as_an_int32_of_its_products_scale() -> None:
    """What ``QLinearConv`` adds (ONNX Runtime's ``WeightBiasQuantization``): the bias rounded
    to an int32 at the scale ``s_x s_w`` of the input and weight codes the backend writes."""
    import numpy as np

    from mpq.evaluators.apply import static_ranges
    from mpq.evaluators.backends.onnx_graph import _conv_weight_codes, _uint8_qparams

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(5) * 0.37)
    model = torch.nn.Sequential(conv).eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(
        layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static", out_bits=8)
    )
    calibration = [(torch.randn(4, 3, 8, 8),)]
    simulated = apply_config(model, config, calibration, layers=layers)
    lo, hi = static_ranges(model, config, calibration, layers=layers)["0"]["input"]
    s_x, _ = _uint8_qparams(lo, hi)
    _, s_w, _ = _conv_weight_codes(conv.weight.detach().numpy(), False)
    scale = np.float32(s_x) * s_w
    want = np.round(conv.bias.detach().numpy() / scale) * scale
    got = simulated[0].bias.detach().numpy()
    assert np.array_equal(got, want.astype(np.float32))
    assert not np.array_equal(got, conv.bias.detach().numpy())  # rounded: it changed
