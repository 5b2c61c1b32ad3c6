"""Measure the shipped policy and write its model card (float and uniform 8/4/2-bit success, the
proxy's rank correlation with real success).

    python -m mpq.zoo.babyai.card --episodes 500 --proxy-configs 30
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from mpq.evaluators.apply import apply_config
from mpq.evaluators.proxy import output_agreement, reference_outputs
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from mpq.zoo.babyai.policy import CHECKPOINT_PATH, LEVELS, build_policy
from mpq.zoo.babyai.task import calibration_batches, evaluate_episodes

HERE = Path(__file__).resolve().parent


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # average ranks over ties
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def uniform_rows(model: torch.nn.Module, episodes: int, calib: list) -> list[dict]:  # type: ignore[type-arg]
    layers = discover_layers(model)
    rows = [{"config": "float32", **evaluate_episodes(model, episodes)}]
    for bits in (8, 4, 3, 2):
        for a_bits in (32, 8):
            choice = LayerChoice(w_bits=bits, a_bits=a_bits)
            qmodel = apply_config(model, QuantConfig.uniform(layers, choice), calib, layers=layers)
            name = f"w{bits}" + ("a8" if a_bits == 8 else "")
            rows.append({"config": name, **evaluate_episodes(qmodel, episodes)})
            print(
                json.dumps(
                    {
                        k: round(v, 3) if isinstance(v, float) else v
                        for k, v in rows[-1].items()
                        if "/" not in k or "success/" in k
                    }
                ),
                flush=True,
            )
    for bits in (8, 4):  # granularity matters too: one scale per tensor instead of per channel
        choice = LayerChoice(w_bits=bits, a_bits=8, granularity="per_tensor")
        qmodel = apply_config(model, QuantConfig.uniform(layers, choice), calib, layers=layers)
        rows.append({"config": f"w{bits}a8 per-tensor", **evaluate_episodes(qmodel, episodes)})
    return rows


def proxy_correlation(model: torch.nn.Module, n_configs: int, episodes: int, calib: list) -> dict:  # type: ignore[type-arg]
    layers = discover_layers(model)
    reference = reference_outputs(model, calib)
    rng = random.Random(0)
    agreement, kl, success = [], [], []
    for _ in range(n_configs):
        config = QuantConfig(
            layers={la.name: LayerChoice(w_bits=rng.choice([2, 3, 4, 8, 32])) for la in layers}
        )
        qmodel = apply_config(model, config, layers=layers)
        proxy = output_agreement(qmodel, calib, reference)
        agreement.append(proxy["agreement"])
        kl.append(-proxy["kl"])
        success.append(evaluate_episodes(qmodel, episodes)["success"])
    return {
        "configs": n_configs,
        "episodes_per_level": episodes,
        "spearman_agreement_vs_success": _spearman(agreement, success),
        "spearman_neg_kl_vs_success": _spearman(kl, success),
    }


def write_card(rows: list[dict], proxy: dict, train: dict, path: Path) -> None:  # type: ignore[type-arg]
    short = [lv.removeprefix("BabyAI-").removesuffix("-v0") for lv in LEVELS]
    lines = [
        "# babyai_vla.pt — the embedded VLA policy",
        "",
        "RGB 56x56 egocentric image + language instruction -> one of 7 actions, GRU memory.",
        f"Levels: {', '.join(short)} (one multi-task policy). "
        f"Parameters: {sum(p.numel() for p in build_policy().parameters()):,}.",
        "",
        "Trained by `python -m mpq.zoo.babyai.train` (behaviour cloning on minigrid's BabyAI bot "
        "demonstrations, then DAgger rounds with the bot as expert), seeds disjoint from the "
        "evaluation seeds. " + _training_sentence(train),
        "",
        f"Success over {rows[0].get('episodes', '?')} evaluation episodes per level "
        "(fixed seeds, 95% Wilson intervals); uniform configurations quantize every layer "
        "(per-channel symmetric weights unless marked per-tensor; `a8` adds dynamic 8-bit "
        "activations):",
        "",
        "| config | " + " | ".join(short) + " | all |",
        "|---|" + "---|" * (len(short) + 1),
    ]
    for r in rows:
        cells = [
            f"{r[f'success/{s}']:.3f} ({r[f'success_lo/{s}']:.3f}-{r[f'success_hi/{s}']:.3f})"
            for s in short
        ]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {r['success']:.3f} |")
    lines += [
        "",
        f"Evaluation speed: {rows[0]['episodes_per_s']:.0f} episodes/s (float, batched).",
        "",
        f"Proxy (action agreement / KL with the float policy on held-out demo inputs) against "
        f"real success on {proxy['configs']} random per-layer configurations "
        f"({proxy['episodes_per_level']} episodes per level): Spearman "
        f"{proxy['spearman_agreement_vs_success']:.2f} (agreement), "
        f"{proxy['spearman_neg_kl_vs_success']:.2f} (-KL).",
    ]
    path.write_text("\n".join(lines) + "\n")


def _training_sentence(train: dict) -> str:  # type: ignore[type-arg]
    if not train:
        return ""
    minutes = float(train.get("train_minutes", 0))
    init = train.get("init_from")
    if not init:
        return f"Training took {minutes:.0f} minutes on 1 CPU thread."
    before = float(init.get("train_minutes", 0))
    levels = ", ".join(lv.removeprefix("BabyAI-").removesuffix("-v0") for lv in init["levels"])
    return (
        f"Trained first on {levels} ({before:.0f} minutes), then fine-tuned from that checkpoint "
        f"on all levels ({minutes:.0f} minutes): {before + minutes:.0f} minutes on 1 CPU thread "
        "(bot demonstrations collected by 2 processes). Reproduce the second step with "
        f"`python -m mpq.zoo.babyai.train --init FIRST.pt --out babyai_vla.pt "
        f"{_flags(train.get('args', {}))}` (arguments in `babyai_vla.train.json`)."
    )


def _flags(args: dict) -> str:  # type: ignore[type-arg]
    keys = ("demos_per_level", "steps", "dagger_rounds", "dagger_episodes", "lr", "threads")
    return " ".join(f"--{k.replace('_', '-')} {args[k]}" for k in keys if k in args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=500)
    p.add_argument("--proxy-configs", type=int, default=30)
    p.add_argument("--proxy-episodes", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "MODEL_CARD.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = build_policy()
    calib = calibration_batches()
    rows = uniform_rows(model, args.episodes, calib)
    for r in rows:
        r["episodes"] = args.episodes
    proxy = proxy_correlation(model, args.proxy_configs, args.proxy_episodes, calib)
    train_json = CHECKPOINT_PATH.with_suffix(".train.json")
    train = json.loads(train_json.read_text()) if train_json.exists() else {}
    write_card(rows, proxy, train, args.out)
    (args.out.with_suffix(".json")).write_text(
        json.dumps({"rows": rows, "proxy": proxy}, indent=1)
    )
    print(f"card written to {args.out} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
