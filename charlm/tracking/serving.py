"""The registered model as a service: what a request may ask for, checked before any work.

The pyfunc (mlflow_model.py) runs every request through this module, whether it comes from
`mlflow models serve` or from `mlflow.pyfunc.load_model(...).predict(...)`:

* params: only the names of the model's signature (PARAM_DEFAULTS, from SamplingParams plus
  num_samples and precision); length 1..CHARLM_MAX_LENGTH; temperature > 0; top_k >= 0;
  0 < top_p <= 1; num_samples 1..CHARLM_MAX_SAMPLES; a precision this host samples in
  (charlm.capability.resolve);
* the input: prompt strings (a list, one string, a Series, a dict or DataFrame with a `prompt`
  column, or a DataFrame of exactly one column);
* the work: streams (prompts x num_samples) at most CHARLM_MAX_STREAMS (a batch's memory grows
  with it), and streams x steps (longest prompt + length) at most CHARLM_MAX_REQUEST_STEPS;
* prompt characters: all in the model's vocabulary (the refusal names the characters).

A refusal is a ServingError: an MlflowException with INVALID_PARAMETER_VALUE, which the scoring
server answers with HTTP 400, and whose message is charlm's one line (see ServingError.message).

Unknown params: MLflow drops a param its signature lacks, with a warning, before the model's
predict sees the params (mlflow.models.utils._enforce_params_schema). UnknownParamsWatch reads
that warning (in the same thread, inside the same prediction context) so predict can refuse it.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from charlm.capability import PrecisionUnavailable, resolve
from charlm.config import SAMPLE_PRECISIONS
from charlm.tracking.registry import PARAM_DEFAULTS
from charlm.vocab import UnknownCharactersError, Vocab

MAX_LENGTH_ENV = "CHARLM_MAX_LENGTH"
MAX_SAMPLES_ENV = "CHARLM_MAX_SAMPLES"
MAX_STREAMS_ENV = "CHARLM_MAX_STREAMS"
MAX_STEPS_ENV = "CHARLM_MAX_REQUEST_STEPS"
DEFAULT_MAX_LENGTH = 10_000  # characters generated per sample
DEFAULT_MAX_SAMPLES = 256  # samples per prompt
DEFAULT_MAX_STREAMS = 1024  # prompts x num_samples per request: one batch
DEFAULT_MAX_STEPS = 2_000_000  # streams x (longest prompt + length) per request


class ServingError(MlflowException, ValueError):
    """A refused request: HTTP 400 (INVALID_PARAMETER_VALUE) whose message is charlm's one line.

    MLflow's scoring server rewrites the message of an MlflowException raised by predict to
    "Failed to predict data '<the input's repr>'. Error: <message>" before it answers; a
    ServingError keeps its own line, so the client reads exactly what charlm says.
    """

    def __init__(self, message: str) -> None:
        self._line = str(message).strip().splitlines()[0] if str(message).strip() else "refused"
        MlflowException.__init__(self, self._line, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:  # MLflow's prefix (with the input's repr) is dropped
        pass


class UnknownPromptCharacters(UnknownCharactersError, ServingError):
    """A prompt with characters outside the vocabulary (still an UnknownCharactersError)."""

    def __init__(self, e: UnknownCharactersError) -> None:
        self.unknown = dict(e.unknown)
        ServingError.__init__(self, str(e))


class PrecisionRefused(PrecisionUnavailable, ServingError):
    """A precision this host does not sample in (still a PrecisionUnavailable)."""

    def __init__(self, e: PrecisionUnavailable) -> None:
        ServingError.__init__(self, str(e))


@dataclass(frozen=True)
class Limits:
    """The bounds of one request; from the environment (from_env) where the model is served."""

    max_length: int = DEFAULT_MAX_LENGTH
    max_samples: int = DEFAULT_MAX_SAMPLES
    max_steps: int = DEFAULT_MAX_STEPS
    max_streams: int = DEFAULT_MAX_STREAMS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        env = os.environ if env is None else env

        def read(name: str, default: int) -> int:
            text = env.get(name, "").strip()
            if not text:
                return default
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 1:
                raise ValueError(f"environment variable {name}={text!r}: want a whole number >= 1")
            return value

        return cls(
            read(MAX_LENGTH_ENV, DEFAULT_MAX_LENGTH),
            read(MAX_SAMPLES_ENV, DEFAULT_MAX_SAMPLES),
            read(MAX_STEPS_ENV, DEFAULT_MAX_STEPS),
            read(MAX_STREAMS_ENV, DEFAULT_MAX_STREAMS),
        )


def _whole(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ServingError(f"param {name}={value!r}: want a whole number")
    try:
        f = float(value)
        if f.is_integer():
            return int(value) if isinstance(value, (int, np.integer)) else int(f)
    except (TypeError, ValueError, OverflowError):
        pass
    raise ServingError(f"param {name}={value!r}: want a whole number")


def _real(name: str, value: Any) -> float:
    if not isinstance(value, (bool, np.bool_)):
        try:
            f = float(value)
            if f == f:  # not NaN
                return f
        except (TypeError, ValueError):
            pass
    raise ServingError(f"param {name}={value!r}: want a number")


def check_params(params: Mapping[str, Any] | None, limits: Limits) -> dict[str, Any]:
    """The request's params with defaults filled in and types made exact, or a ServingError
    naming the first param out of bounds. Precision comes back as the one that will run."""
    given = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(given) - set(PARAM_DEFAULTS), key=str)
    if unknown:
        raise ServingError(f"unknown params {unknown}: known params are {sorted(PARAM_DEFAULTS)}")
    p = {**PARAM_DEFAULTS, **given}
    out: dict[str, Any] = {
        "length": _whole("length", p["length"]),
        "temperature": _real("temperature", p["temperature"]),
        "top_k": _whole("top_k", p["top_k"]),
        "top_p": _real("top_p", p["top_p"]),
        "seed": _whole("seed", p["seed"]),
        "num_samples": _whole("num_samples", p["num_samples"]),
        "stop": "" if p["stop"] is None else str(p["stop"]),
    }
    bounds = [
        ("length", 1 <= out["length"] <= limits.max_length, f"1..{limits.max_length} ({MAX_LENGTH_ENV})"),
        ("temperature", 0 < out["temperature"] < float("inf"), "> 0"),
        ("top_k", out["top_k"] >= 0, ">= 0 (0 keeps every character)"),
        ("top_p", 0 < out["top_p"] <= 1, "in (0, 1]"),
        (
            "num_samples",
            1 <= out["num_samples"] <= limits.max_samples,
            f"1..{limits.max_samples} ({MAX_SAMPLES_ENV})",
        ),
    ]
    for name, ok, want in bounds:
        if not ok:
            raise ServingError(f"param {name}={p[name]!r}: out of range, want {want}")
    if len(out["stop"]) > limits.max_length:
        raise ServingError(f"param stop: {len(out['stop'])} characters, want at most {limits.max_length}")
    precision = str(p["precision"])
    if precision not in SAMPLE_PRECISIONS:
        raise ServingError(f"param precision={precision!r}: want one of {', '.join(SAMPLE_PRECISIONS)}")
    try:
        out["precision"] = resolve(precision, "cpu", "sample")
    except PrecisionUnavailable as e:
        raise PrecisionRefused(e) from None
    return out


def _cell(v: Any, i: int) -> str:
    if v is None or (isinstance(v, float) and v != v):  # None / NaN cell: no prompt
        return ""
    if isinstance(v, (str, np.str_)):
        return str(v)
    raise ServingError(f"prompt {i + 1}: want a string, got {type(v).__name__}")


def prompts_from_input(model_input: Any) -> list[str]:
    """The prompt strings of a request: a list of strings, one string, a Series, an array, a dict
    with a 'prompt' key, or a DataFrame with a 'prompt' column or exactly one column."""
    if isinstance(model_input, (str, np.str_)):
        values: Sequence[Any] = [str(model_input)]
    elif isinstance(model_input, pd.DataFrame):
        cols = list(model_input.columns)
        if "prompt" in cols:
            values = model_input["prompt"].tolist()
        elif len(cols) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise ServingError(
                f"input: a DataFrame needs a 'prompt' column or exactly one column, got columns {cols}"
            )
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, dict):
        if set(model_input) != {"prompt"}:
            raise ServingError(
                f"input: a mapping needs exactly the key 'prompt', got keys {sorted(model_input, key=str)}"
            )
        p = model_input["prompt"]
        values = [p] if isinstance(p, (str, np.str_)) else list(np.asarray(p, dtype=object).ravel())
    elif isinstance(model_input, np.ndarray):
        values = (
            list(model_input.astype(object).ravel())
            if model_input.ndim <= 1 or 1 in model_input.shape[1:]
            else None
        )
        if values is None:
            raise ServingError(f"input: an array of prompts needs one column, got shape {model_input.shape}")
    elif isinstance(model_input, (list, tuple)):
        values = model_input
    else:
        raise ServingError(
            f"input: want prompt strings (a list or a 'prompt' column), got {type(model_input).__name__}"
        )
    return [_cell(v, i) for i, v in enumerate(values)]


def check_request(prompts: Sequence[str], p: Mapping[str, Any], vocab: Vocab, limits: Limits) -> None:
    """Refuses a request over the stream or work cap (before touching its text), then one whose
    prompts hold characters outside the vocabulary, naming them."""
    streams = len(prompts) * int(p["num_samples"])
    if streams > limits.max_streams:
        raise ServingError(
            f"request too large: {len(prompts)} prompt(s) x {p['num_samples']} sample(s) = {streams:,} "
            f"streams, over the limit of {limits.max_streams:,} ({MAX_STREAMS_ENV})"
        )
    steps = max((len(q) for q in prompts), default=0) + int(p["length"])
    if streams * steps > limits.max_steps:
        raise ServingError(
            f"request too large: {len(prompts)} prompt(s) x {p['num_samples']} sample(s) x "
            f"{steps} steps (longest prompt + length) = {streams * steps:,} character steps, over "
            f"the limit of {limits.max_steps:,} ({MAX_STEPS_ENV})"
        )
    for i, q in enumerate(prompts):
        try:
            vocab.encode(q, where=f"prompt {i + 1}" if len(prompts) > 1 else "prompt")
        except UnknownCharactersError as e:
            raise UnknownPromptCharacters(e) from None


def example_prompt(vocab: Vocab) -> str:
    """A short prompt the vocabulary can encode, for the logged input example."""
    for candidate in ("The ", "the ", "def ", "A", "a"):
        if all(c in vocab for c in candidate):
            return candidate
    return ""


# -- unknown params ---------------------------------------------------------------------------------------------------
_IGNORED = re.compile(r"Unrecognized params (\[.*?\]) are ignored")
PARAMS_LOGGER = "mlflow.models.utils"  # the logger of mlflow.models.utils._enforce_params_schema


class UnknownParamsWatch(logging.Filter):
    """Remembers the params MLflow dropped as unrecognized, per thread and prediction context.

    MLflow's PyFuncModel.predict sets a fresh prediction context (mlflow.pyfunc.context) for each
    call, drops unknown params with a warning and then calls the model's predict in the same
    thread; predict asks dropped() for the names dropped in its own context. A warning left from
    a call that failed before reaching predict belongs to another context and is never reported.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        m = _IGNORED.search(record.getMessage())
        ctx = _prediction_context()
        if m and ctx is not None:
            try:
                names = [str(n) for n in ast.literal_eval(m.group(1))]
            except (ValueError, SyntaxError):
                names = [m.group(1)]
            self._seen.entry = (ctx, sorted(names))
        return True  # the warning is still logged

    def dropped(self) -> list[str]:
        """The names MLflow dropped in the current prediction context (and forgets them)."""
        entry = getattr(self._seen, "entry", None)
        self._seen.entry = None
        ctx = _prediction_context()
        return entry[1] if entry is not None and ctx is not None and entry[0] is ctx else []

    @classmethod
    def install(cls) -> UnknownParamsWatch:
        """The one watch on MLflow's params logger (added on first use), which must log warnings."""
        logger = logging.getLogger(PARAMS_LOGGER)
        for f in logger.filters:
            if isinstance(f, cls):
                return f
        watch = cls()
        logger.addFilter(watch)
        if not logger.isEnabledFor(logging.WARNING):
            logger.setLevel(logging.WARNING)
        return watch


def _prediction_context() -> Any:
    try:
        from mlflow.pyfunc.context import get_prediction_context
    except ImportError:  # pragma: no cover - an MLflow without prediction contexts
        return None
    return get_prediction_context()
