"""The registered model, as MLflow "models from code": a pyfunc around a charlm checkpoint.

MLflow executes this file when a version is logged and when it is loaded
(`mlflow.pyfunc.load_model("models:/NAME@champion")`); it is not imported by charlm itself.
Like all of charlm's MLflow code it lives in charlm/tracking/.
The loading environment needs charlm installed (torch, numpy).

Input: a list of prompts, one prompt string, a pandas Series, or a DataFrame with a `prompt`
column (or exactly one column). Params (all optional): length, temperature, top_k, top_p, seed,
num_samples, stop, precision. Output: a list of generated continuations (the prompt itself is not
repeated), `num_samples` per prompt in prompt order: the same texts `charlm sample` prints for the
same checkpoint, prompts and seed. The checkpoint is loaded on CPU with `weights_only` loading,
whatever device trained it.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from charlm.tracking import PARAM_DEFAULTS


def _prompts(model_input: Any) -> list[str]:
    """A list of prompt strings from any of the accepted input shapes."""
    if isinstance(model_input, str):
        values: list[Any] = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            values = model_input["prompt"].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise ValueError(
                f"charlm model input: a DataFrame needs a 'prompt' column or exactly one column, "
                f"got columns {list(model_input.columns)}"
            )
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, dict) and "prompt" in model_input:
        p = model_input["prompt"]
        values = [p] if isinstance(p, str) else list(p)
    else:
        try:
            values = list(model_input)
        except TypeError:
            raise ValueError(
                f"charlm model input: expected prompts (a list of strings or a DataFrame column), "
                f"got {type(model_input).__name__}"
            ) from None
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v):  # None / NaN cell: no prompt
            out.append("")
        elif isinstance(v, str):
            out.append(v)
        else:
            raise ValueError(f"charlm model input: prompts must be strings, got {type(v).__name__}")
    return out


class CharLMModel(PythonModel):
    """Generates text from a charlm checkpoint stored as the artifact 'checkpoint'."""

    def load_context(self, context):
        from charlm.checkpoint import load_model

        path = context.artifacts["checkpoint"]
        self.model, self.vocab, ckpt = load_model(path, name=path, device="cpu")
        self.step = ckpt.get("step")

    # model_input is annotated with pd.DataFrame, a type MLflow infers no schema from: an
    # inferable hint (list[str]...) would replace the logged signature and drop its params.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from charlm.sample import Sampler

        p = {**PARAM_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        unknown = sorted(set(p) - set(PARAM_DEFAULTS))
        if unknown:
            raise ValueError(f"charlm model: unknown params {unknown}; known: {sorted(PARAM_DEFAULTS)}")
        num = int(p["num_samples"])
        if num < 1:
            raise ValueError(f"charlm model: num_samples must be at least 1, got {num}")
        prompts = [q for q in _prompts(model_input) for _ in range(num)]
        if not prompts:
            return []
        sampler = Sampler(self.model, self.vocab, precision=str(p["precision"]), max_batch=len(prompts))
        return sampler.generate(
            prompts,
            int(p["length"]),
            temperature=float(p["temperature"]),
            top_k=int(p["top_k"]),
            top_p=float(p["top_p"]),
            seed=int(p["seed"]),
            stop=str(p["stop"]) or None,
        )


mlflow.models.set_model(CharLMModel())
