"""The output(s) that matter: ``output: logits`` and its errors."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from torch import nn

from mpq.evaluators.outputs import pick, select_output

Pair = namedtuple("Pair", ["mean", "std"])


@dataclasses.dataclass
class Policy:
    action: Pair
    value: torch.Tensor


def test_a_path_walks_keys_fields_and_indices() -> None:
    a, b, v = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    out = {"policy": Policy(Pair(a, b), v), "aux": (a, (b, v))}
    assert pick(out, "policy.action.mean") is a
    assert pick(out, "policy.value") is v
    assert pick(out, "aux.1.0") is b
    assert pick(out, "aux.-1.1") is v
    state = {"observation.state": (a, b)}  # a key with dots (a LeRobot feature)
    assert pick(state, "observation.state.1") is b
    with pytest.raises(ValueError, match="with no '--1'"):
        pick(out, "aux.--1")


def test_a_missing_step_says_what_was_returned_and_what_to_set() -> None:
    out = {"logits": torch.ones(2, 3), "hidden": (torch.ones(1),)}
    with pytest.raises(ValueError) as err:
        pick(out, "action")
    assert str(err.value) == (
        "output 'action': the model returned dict(logits, hidden), with no 'action'; "
        "set output to one of logits, hidden"
    )
    with pytest.raises(ValueError, match=r"at '3': tuple\(0\)\), with no '3'; set output to one"):
        pick(out, "hidden.3")


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.action = nn.Linear(16, 4)
        self.value = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"value": self.value(h), "action": self.action(h)}


def test_a_selected_output_is_what_every_copy_returns_and_exports() -> None:
    import copy

    from mpq.evaluators.backends.onnxruntime_backend import export_onnx

    torch.manual_seed(0)
    model = select_output(_TwoHeads().eval(), "action")
    x = torch.randn(1, 8)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 4)
        torch.testing.assert_close(copy.deepcopy(model)(x), out)
    names = [n for n, _ in model.named_modules()]
    assert names == ["", "body", "action", "value"]  # no wrapper: the space's names stay
    for inputs in ((x,), {"x": x}):  # a keyword export calls the model once: selected once
        graph = export_onnx(model, inputs).graph
        assert len(graph.output) == 1
        assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, 4]


def test_a_path_that_ends_before_a_tensor_is_one_line() -> None:
    model = select_output(_TwoHeads().eval(), ("action", "value"))
    out = model(torch.randn(2, 8))
    assert [t.shape for t in out] == [(2, 4), (2, 1)]
    nested = select_output(nn.Identity(), "0")
    with pytest.raises(ValueError, match=r"output '0' is tuple\(0, 1\), not a tensor"):
        nested(((torch.ones(1), torch.ones(1)),))


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("", "output '': expected a path like 'logits'"),
        ("logits..x", "output 'logits..x': expected a path"),
        ([], "output: an empty list names nothing"),
        (["logits", "m:f"], "output: a 'module:function' stands alone"),
    ],
)
def test_a_bad_output_in_a_config_is_refused(output: object, message: str) -> None:
    from pydantic import ValidationError

    from mpq.search.config import SearchConfig

    base = {"name": "s", "model": "m:f", "task": "m:t", "calibration": "m:c"}
    with pytest.raises(ValidationError, match=message):
        SearchConfig.model_validate(base | {"output": output})
    good = SearchConfig.model_validate(base | {"output": ["logits", "0"]})
    assert good.output == ("logits", "0")
