"""The registered model, as MLflow "models from code": a pyfunc around a charlm checkpoint.

MLflow executes this file when a version is logged and when it is loaded
(`mlflow.pyfunc.load_model("models:/NAME@champion")`, `mlflow models serve`); it is not imported
by charlm itself. Like all of charlm's MLflow code it lives in charlm/tracking/.
The loading environment needs charlm installed (torch, numpy).

Input: a list of prompts, one prompt string, a pandas Series, a dict {"prompt": [...]}, or a
DataFrame with a `prompt` column (or exactly one column). Params (all optional, the signature
declares each with its type and default): length, temperature, top_k, top_p, seed, num_samples,
stop, precision. Output: a list of generated continuations (the prompt itself is not repeated),
`num_samples` per prompt in prompt order: the same texts `charlm sample` prints for the same
checkpoint, prompts and seed. A request's prompts x num_samples streams run as one batch.

Every request is checked before any work (charlm.tracking.serving: bounds, limits from the
environment, unknown params, prompt characters); a refusal is an MlflowException with
INVALID_PARAMETER_VALUE (HTTP 400 from the scoring server) whose message is charlm's one line.
The checkpoint is loaded on CPU with `weights_only` loading, whatever device trained it.
"""

from __future__ import annotations

import threading

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from charlm.tracking import serving


class CharLMModel(PythonModel):
    """Generates text from a charlm checkpoint stored as the artifact 'checkpoint'."""

    def load_context(self, context):
        from charlm.checkpoint import load_model

        path = context.artifacts["checkpoint"]
        self.model, self.vocab, ckpt = load_model(path, name=path, device="cpu")
        self.step = ckpt.get("step")
        self.limits = serving.Limits.from_env()
        self.watch = serving.UnknownParamsWatch.install()
        # One Sampler per precision, reused (building one packs the weights: tens of ms). The
        # scoring server runs requests in threads: one generation at a time per process, as the
        # Sampler's buffers are shared and torch already uses every core for one batch.
        self._samplers = {}
        self._lock = threading.Lock()

    # model_input is annotated with pd.DataFrame, a type MLflow infers no schema from: an
    # inferable hint (list[str]...) would replace the logged signature and drop its params.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from charlm.sample import Sampler

        dropped = self.watch.dropped()  # params MLflow removed before this call, as unknown
        if dropped:
            raise serving.ServingError(
                f"unknown params {dropped}: known params are {sorted(serving.PARAM_DEFAULTS)}"
            )
        p = serving.check_params(params, self.limits)
        prompts = serving.prompts_from_input(model_input)
        serving.check_request(prompts, p, self.vocab, self.limits)
        streams = [q for q in prompts for _ in range(p["num_samples"])]
        if not streams:
            return []
        with self._lock:
            sampler = self._samplers.get(p["precision"])
            if sampler is None:
                sampler = Sampler(self.model, self.vocab, precision=p["precision"], max_batch=len(streams))
                self._samplers[p["precision"]] = sampler
            return sampler.generate(  # every stream of the request in one batch
                streams,
                p["length"],
                temperature=p["temperature"],
                top_k=p["top_k"],
                top_p=p["top_p"],
                seed=p["seed"],
                stop=p["stop"] or None,
            )


mlflow.models.set_model(CharLMModel())
