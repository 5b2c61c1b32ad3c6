"""The search configuration file (YAML/JSON): frozen, typed, versioned data.

Every field is documented here; ``mpq config-reference`` prints the table the README carries,
generated from these models so it cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mpq.evaluators.qat import QatSettings
from mpq.spaces.io import parse_model, read_data
from mpq.spaces.space import SearchSpace

_FROZEN = ConfigDict(frozen=True, extra="forbid")
OBJECTIVES = {"success": "maximize", "size_bytes": "minimize", "latency_ms": "minimize"}
SAMPLERS = ("nsga2", "tpe", "random", "gp")
Objective = Literal["success", "size_bytes", "latency_ms"]


class Constraints(BaseModel):
    """Feasibility; infeasible trials are kept and marked (Optuna ``constraints_func``)."""

    model_config = _FROZEN
    max_success_drop: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="success >= float success - this (absolute, e.g. 0.05 = 5 points; a "
        "negative drop would ask more than the float model, which nothing meets)",
    )
    max_size_bytes: int | None = Field(None, gt=0, description="size budget in bytes")
    max_latency_ms: float | None = Field(None, gt=0, description="latency budget in milliseconds")


class Sensitivity(BaseModel):
    """Per-layer sensitivity before the search; seeds the study with greedy allocations."""

    model_config = _FROZEN
    enabled: bool = Field(
        True,
        description="measure per-layer sensitivity (the mpq sampler's success model) and "
        "enqueue the seed trials below",
    )
    budgets: tuple[float, ...] = Field(
        (),
        description="greedy seed allocations at these fractions of the 8-bit size (none by "
        "default, as seeds take trials from a small budget; the examples ask for some: README)",
    )
    uniform_bits: tuple[int, ...] = Field((), description="uniform seed trials at these bits")
    ilp_budgets: tuple[float, ...] = Field(
        (),
        description="ILP allocations (least summed sensitivity within the size, solved exactly "
        "with scipy's milp; float allowed where the space offers it) at these fractions of "
        "the 8-bit size",
    )

    @field_validator("budgets", "ilp_budgets")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"{bad[0]} is not a fraction of the 8-bit size in (0, 1]")
        return v


class LatencyConfig(BaseModel):
    """How latency is measured: on real kernels of ``backend``, batch 1, fixed threads."""

    model_config = _FROZEN
    enabled: bool = Field(
        True, description="measure latency (needed for the latency_ms objective)"
    )
    backend: str = Field(
        "onnxruntime",
        description="onnxruntime (CPU), torch (torchao + torch.compile, CPU), torch-cuda, "
        "torch-cuda-fp8 (GPU; needs ray.gpus_per_trial > 0), torch-eager (no compiler)",
    )
    threads: int = Field(1, ge=1, description="intra-op threads while timing")
    warmup: int = Field(5, ge=0, description="untimed calls first")
    runs: int = Field(100, ge=3, description="timed calls per visit (after warmup)")
    visits: int = Field(
        8,
        ge=2,
        description="visit pairs of the latency protocol: float and the candidate each on a "
        "fresh session, in random order, in the node's exclusive timing slot; the speed-up's "
        "95% interval is over these pairs",
    )
    autotune: bool = Field(
        True,
        description="where a choice runs on several kernels with the same numerics (ONNX "
        "Runtime weight-only: float MatMul of weights dequantized at load, or MatMulNBits "
        "float-input), time each layer's candidates in the whole model once per study on a "
        "trial worker and run the fastest (kernel_table.json; no cost where none has two)",
    )
    predict_screen: bool = Field(
        False,
        description="screen trials with the latency table's prediction (built once per study "
        "on a trial worker); measure for real only the trials that pass screening",
    )
    allow_fallback: bool = Field(
        True,
        description="run a choice the backend has no kernel for on the nearest one it has "
        "(recorded per trial); false: such a choice is an error before the search starts",
    )
    agent: str | None = Field(
        None,
        description="http://host:port of an `mpq agent` on the target: each trial's model is "
        "timed there (onnxruntime backend; the token in MPQ_AGENT_TOKEN)",
    )

    @field_validator("agent")
    @classmethod
    def _agent(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"agent={v!r}: expected http://host:port")
        return v

    @model_validator(mode="after")
    def _agent_runs_onnx(self) -> LatencyConfig:
        if self.agent is not None and self.backend != "onnxruntime":
            raise ValueError(
                f"agent: an mpq agent times ONNX Runtime files; backend {self.backend!r} has none"
            )
        return self

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from mpq.evaluators.backends import BACKENDS

        if v not in BACKENDS:
            raise ValueError(f"backend={v!r} not in {sorted(BACKENDS)}")
        return v


class RayConfig(BaseModel):
    """Where trials run: a local Ray started by the command, or an existing cluster."""

    model_config = _FROZEN
    address: str | None = Field(None, description="existing cluster address (None: start one)")
    workers: int = Field(2, ge=1, description="trials in flight at once")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs reserved per trial")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs reserved per trial")
    resources_per_trial: dict[str, float] = Field(
        default_factory=dict, description="custom resources, e.g. {target_cpu_arm: 1}"
    )
    max_retries: int = Field(1, ge=0, description="retries of a trial whose worker died")


class TrackingConfig(BaseModel):
    """MLflow tracking."""

    model_config = _FROZEN
    enabled: bool = Field(True, description="track trials in MLflow")
    uri: str | None = Field(None, description="tracking URI (None: SQLite store in output_dir)")
    required: bool = Field(False, description="fail at start when the tracking store is down")


def masked_url(url: str) -> str:
    """``postgresql://mpq:***@db/mpq`` for ``postgresql://mpq:secret@db/mpq``: a database
    password never reaches logs, MLflow or error messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@", 1)[-1] if "@" in url else url


class SearchConfig(BaseModel):
    """``mpq search CONFIG``: what to search, how to measure, where to keep it."""

    model_config = _FROZEN
    schema_version: Literal[1] = 1
    name: str = Field(..., description="study name (Optuna study and MLflow experiment)")
    model: str = Field(..., description="model builder 'module:function' or a built-in name")
    checkpoint: str | None = Field(None, description="state_dict path (weights_only=True)")
    output: str | tuple[str, ...] | None = Field(
        None,
        description="the model's output(s) that matter, read by the task, the proxy and the "
        "export: a path of keys, fields or indices ('logits', '0', 'action.mean'), a list of "
        "them, or 'module:function'(output) -> tensors (None: the whole output; the proxy "
        "reads its first tensor, a mapping's logits)",
    )
    task: str = Field(..., description="task 'module:function'(model, budget) -> metrics")
    calibration: str = Field(..., description="'module:function'() -> list of input batches")
    example_inputs: str | None = Field(None, description="batch-1 inputs for latency")
    space: SearchSpace = Field(default_factory=SearchSpace, description="the search space")
    objectives: tuple[Objective, ...] = Field(
        ("success", "size_bytes", "latency_ms"), description="any subset, in this order"
    )
    constraints: Constraints = Field(default_factory=Constraints)
    sampler: Literal["nsga2", "tpe", "random", "gp", "mpq"] = Field(
        "mpq",
        description="Optuna sampler; mpq (default, chosen by benchmarks/exhaustive.py; "
        "compare.py ranks no sampler beyond its noise: README): model-based (predicted "
        "size, latency and success, most predicted hypervolume improvement; "
        "search/model_sampler.py)",
    )
    population_size: int = Field(16, ge=2, description="NSGA-II population size")
    trials: int = Field(24, ge=1, description="trials to finish (complete, pruned or failed)")
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="wall-time budget of one run of the search, in seconds: no trial starts "
        "after it (running ones finish; like Optuna's timeout); None: only the trial budget",
    )
    seed: int = Field(0, description="sampler seed")
    task_budget: int = Field(50, ge=1, description="full-fidelity task budget (episodes)")
    confirm_task: str | None = Field(
        None,
        description="'module:function'(model, budget) -> metrics on held-out episodes the search "
        "never uses: export confirms the exported model's success with it",
    )
    confirm_budget: int = Field(0, ge=0, description="confirm_task's budget (0: no confirmation)")
    screen_budget: int = Field(
        0, ge=0, description="cheap-check task budget before the full one (0: no screening)"
    )
    refine_budget: int = Field(
        0,
        ge=0,
        description="a close call's extra episodes: a trial whose success interval after the "
        "full budget holds the success constraint's threshold runs again on task_budget + "
        "refine_budget episodes (the task's first ones: the full budget's are run again), "
        "which decide it (0: never)",
    )
    trial_timeout_s: float = Field(900, gt=0, description="a trial running longer fails")
    trial_memory_mb: int | None = Field(
        None, gt=0, description="a trial allocating more than this (MiB) fails"
    )
    observer: Literal["minmax", "percentile", "mse"] = Field("minmax", description="calibration")
    storage: str | None = Field(
        None,
        description="Optuna RDB URL (None: SQLite in output_dir); a PostgreSQL password "
        "is best left out of it and given in PGPASSWORD",
    )
    storage_retry_s: float = Field(
        300,
        ge=0,
        description="how long a search waits for a server database that stopped answering "
        "(retried with back-off) before it stops",
    )
    output_dir: str = Field("mpq-runs", description="study database, caches, exports")
    sensitivity: Sensitivity = Field(default_factory=Sensitivity)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    qat: QatSettings = Field(
        default_factory=QatSettings,
        description="quantization-aware training of one configuration (mpq finetune)",
    )

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"objectives needs at least one of {sorted(OBJECTIVES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"objectives has repeats: {list(v)}")
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        paths = (v,) if isinstance(v, str) else v or ()
        if isinstance(v, tuple) and not v:
            raise ValueError("output: an empty list names nothing (leave output out instead)")
        for p in paths:
            if not p or any(not part for part in p.split(":", 1)[-1].split(".")):
                raise ValueError(
                    f"output {p!r}: expected a path like 'logits' or 'action.mean', or "
                    "'module:function'"
                )
        if isinstance(v, tuple) and any(":" in p for p in v):
            raise ValueError("output: a 'module:function' stands alone, not in a list")
        return v

    @model_validator(mode="after")
    def _latency(self) -> SearchConfig:
        if "latency_ms" in self.objectives and not self.latency.enabled:
            raise ValueError("objective latency_ms needs latency.enabled: true")
        if "cuda" in self.latency.backend and self.latency.enabled and not self.ray.gpus_per_trial:
            raise ValueError(
                f"latency.backend {self.latency.backend!r} runs on a GPU: set "
                "ray.gpus_per_trial > 0 (Ray hides the GPUs from trials that reserve none)"
            )
        if self.screen_budget >= self.task_budget:
            raise ValueError(
                f"screen_budget={self.screen_budget} must be < task_budget={self.task_budget}"
            )
        if self.refine_budget and self.constraints.max_success_drop is None:
            raise ValueError(
                f"refine_budget={self.refine_budget} needs constraints.max_success_drop: "
                "the threshold a close call is decided against"
            )
        return self

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{Path(self.output_dir).resolve() / 'study.db'}"

    def storage_shown(self) -> str:
        """The storage URL with any password masked: what logs and messages may show."""
        return masked_url(self.storage_url())

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{Path(self.output_dir).resolve() / 'mlflow.db'}"


def load_search_config(path: str | Path, **overrides: object) -> SearchConfig:
    """Read and validate a search config; ``overrides`` replace top-level fields (CLI flags)."""
    data = read_data(path)
    if isinstance(data, dict):
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_model(SearchConfig, data, str(path))
