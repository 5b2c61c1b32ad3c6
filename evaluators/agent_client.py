"""The search's side of ``mpq agent`` (``mpq/agent.py``): send a trial's deployable model and
the float model's to the agent on the target, get the latency protocol's figures back."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import urllib.error
import urllib.request
from typing import Any

import numpy as np

TOKEN_ENV = "MPQ_AGENT_TOKEN"


def time_on_agent(
    url: str,
    reference: bytes,
    candidate: bytes,
    inputs: dict[str, np.ndarray],
    visits: int,
    runs: int,
    warmup: int,
    threads: int,
    timeout_s: float = 900,
    token: str | None = None,
) -> dict[str, Any]:
    """The agent's figures for ``candidate`` against ``reference`` (both ``.onnx`` bytes) on
    ``inputs`` (one step at batch 1, by input name).

    Raises:
        ValueError: one line naming the agent: no token set here, the agent refused (its
            reason), did not answer, or died mid-request (the trial fails with it).
    """
    token = token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ValueError(f"latency.agent {url}: set {TOKEN_ENV} to the agent's token")
    buf = io.BytesIO()
    np.savez(buf, **inputs)
    body = json.dumps(
        {
            "reference": base64.b64encode(reference).decode(),
            "candidate": base64.b64encode(candidate).decode(),
            "inputs": base64.b64encode(buf.getvalue()).decode(),
            "visits": visits,
            "runs": runs,
            "warmup": warmup,
            "threads": threads,
        }
    ).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/time",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, OSError):
            reason = exc.reason
        raise ValueError(f"latency agent {url} refused ({exc.code}): {reason}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"latency agent {url} did not answer: {reason!s:.200}") from None
