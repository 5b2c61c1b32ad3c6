"""The flagship policy: its step graph, its once-per-episode encoder, its checkpoint, its training
script, and its lowering to low-bit kernels (trunk and memory GRU on MatMulNBits)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from mpq.evaluators.apply import apply_config
from mpq.evaluators.backends import get_backend
from mpq.evaluators.task import run_task
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from mpq.zoo import resolve_model
from mpq.zoo.babyai import (
    FLAGSHIP_CHECKPOINT_PATH,
    build_flagship,
    build_policy,
    build_untrained_flagship,
    evaluate_episodes,
    flagship_calibration_batches,
    flagship_example_inputs,
)
from mpq.zoo.babyai.flagship import flagship_state, load_flagship_state
from mpq.zoo.babyai.train_flagship import transfer


def _step_inputs(policy) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
    """Two episodes of three steps: (image, words, instr, memory)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (2, 3, 56, 56, 3), dtype=torch.uint8, generator=g)
    words, instr = policy.episode_context(["go to the red ball", "pick up a key"])
    return image, words, instr, policy.initial_memory(2)


def test_the_step_graph_holds_the_parameters_and_not_the_encoder() -> None:
    policy = build_untrained_flagship()
    names = {la.name for la in discover_layers(policy)}
    assert "word_embedding" not in names and not any(n.startswith("encoder") for n in names)
    assert {"fuse", "trunk.0.up", "trunk.1.down", "memory_gru.weight_hh_l0"} <= names
    params = sum(p.numel() for p in policy.parameters())
    assert 20e6 <= params <= 25e6  # memory-bound at batch 1: 84 MB float32 > a 32 MiB L3
    image, words, instr, memory = _step_inputs(policy)
    assert words.shape == (2, 24, 64) and instr.shape == (2, 64)
    with torch.no_grad():
        logits, new_memory = policy(image, words, instr, memory)
        again = policy.act(policy.perceive(image, words, instr), memory)
    assert logits.shape == (2, 3, 7) and new_memory.shape == memory.shape
    assert torch.equal(logits, again[0])


def test_checkpoint_round_trip_keeps_the_encoder(tmp_path: Path) -> None:
    policy = build_untrained_flagship()
    path = tmp_path / "f.pt"
    torch.save(flagship_state(policy, torch.float16), path)
    loaded = build_flagship(path)
    x = _step_inputs(loaded)
    for key, value in policy.state_dict().items():  # float16 storage: the reference is it
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key
    w_a, _ = policy.episode_context(["go to the red ball"])
    w_b, _ = loaded.episode_context(["go to the red ball"])
    assert (w_a - w_b).abs().max() < 1e-2  # float16-rounded encoder weights
    with torch.no_grad():
        assert torch.isfinite(loaded(*x)[0]).all()
    state = torch.load(path, weights_only=True)
    load_flagship_state(build_untrained_flagship(), state)  # the loader accepts its own file


def test_transfer_copies_and_freezes_the_tiny_stem_and_encoder() -> None:
    tiny, policy = build_policy(), build_untrained_flagship()
    transfer(policy, tiny)
    assert torch.equal(policy.patch_embed.weight, tiny.patch_embed.weight)
    assert torch.equal(policy.cross_attn.in_proj_weight, tiny.cross_attn.in_proj_weight)
    assert torch.equal(policy.encoder.word_embedding.weight, tiny.word_embedding.weight)
    assert not policy.patch_embed.weight.requires_grad and policy.fuse.weight.requires_grad


def test_flagship_lowers_trunk_and_memory_to_matmulnbits() -> None:
    """Every product on MatMulNBits; the file runs the simulated model's numbers. Fourteen
    chained int8 inputs: where float summation order puts a value on a rounding tie, one int8
    code flips and the difference carries on, so some inputs match exactly and none is off by
    more than a small part of the quantization error itself (a wrong kernel is off by all)."""
    from mpq.evaluators.backends.onnx_nbits import int8_input_runs

    if not int8_input_runs(4):
        pytest.skip("this CPU's MatMulNBits has no int8-input kernel (a8 runs weight-only)")
    policy = build_untrained_flagship()
    layers = discover_layers(policy)
    choice = LayerChoice(w_bits=4, a_bits=8, granularity="per_group", group_size=32)
    config = QuantConfig.uniform(layers, choice)
    convs = {la.name: LayerChoice() for la in layers if la.kind == "conv2d"}
    config = config.model_copy(update={"layers": {**config.layers, **convs}})
    exact = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        image = torch.randint(0, 255, (1, 1, 56, 56, 3), dtype=torch.uint8, generator=g)
        x = (image, *policy.episode_context(["go to the red ball"]), policy.initial_memory(1))
        lowered = get_backend("onnxruntime").lower(policy, layers, config, x, calibration=[x])
        with torch.inference_mode():
            out = torch.as_tensor(lowered.run()[0])
            sim = apply_config(policy, lowered.ran_config, [x], layers=layers)(*x)[0]
            ref = policy(*x)[0]
        error, quant_error = float((out - sim).abs().max()), float((ref - sim).abs().max())
        assert error <= 0.15 * quant_error, (seed, error, quant_error)
        exact += error <= 1e-5
    assert exact >= 2
    for name in ("fuse", "trunk.0.up", "trunk.1.down", "memory_gru.weight_ih_l0"):
        assert lowered.kernels[name] == "MatMulNBits int4 block32 acc4", name
    graph = onnx.load_from_string(lowered.artifact)
    assert "GRU" not in {n.op_type for n in graph.graph.node}
    assert len(lowered.artifact) < 0.2 * sum(p.numel() * 4 for p in policy.parameters())


def test_shipped_flagship_loads_and_succeeds() -> None:
    assert resolve_model("babyai-flagship") == "mpq.zoo.babyai:build_flagship"
    assert FLAGSHIP_CHECKPOINT_PATH.stat().st_size <= 50e6
    policy = build_flagship()
    metrics = run_task(evaluate_episodes, policy, 10)
    assert metrics["success"] >= 0.85  # model card: within 2 points of the tiny policy
    image, words, instr, memory = flagship_example_inputs()
    assert image.shape == (1, 1, 56, 56, 3) and words.shape == (1, 24, 64)
    assert instr.shape == (1, 64) and memory.shape == (1, 1, 256)
    batches = flagship_calibration_batches(episodes_per_level=1)
    assert batches and all(len(b) == 4 and b[0].dtype == torch.uint8 for b in batches)


def test_flagship_training_script_runs(tmp_path: Path) -> None:
    from mpq.zoo.babyai.train_flagship import main

    out = tmp_path / "flagship.pt"
    main(
        [
            "--out",
            str(out),
            "--demos-per-level",
            "2",
            "--steps",
            "2",
            "--dagger-rounds",
            "1",
            "--dagger-episodes",
            "1",
            "--eval-episodes",
            "1",
            "--batch-size",
            "2",
            "--workers",
            "1",
            "--threads",
            "1",
        ]
    )
    policy = build_flagship(out)  # loads with weights_only=True
    assert sum(p.numel() for p in policy.parameters()) > 20_000_000
    assert out.with_suffix(".train.json").exists()
