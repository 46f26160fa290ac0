"""What a model predicts and what its cells track, over one text (core: stdlib, numpy, torch).

`trace` runs the model once over the whole text as one stream (exactly its own forward, from a
zero state) and keeps, per position t:

- prob[t]: the probability the model gave text[t] after reading text[:t] (NaN at t = 0, which
  nothing predicts), and the top 5 characters it expected there with their probabilities;
- every layer's hidden state h_t and, for an LSTM, tanh(c_t) (the cell state as the post shows it).

How: layer by layer, the fused kernel (torch.lstm / gru / rnn_tanh) runs the whole sequence and
returns h_t for every t. An LSTM's c_t is then recovered without a second recurrence through the
weights: all gates i, f, g, o = W_ih x_t + W_hh h_{t-1} + b come out of one batched matmul over
the sequence, and c_t = f_t c_{t-1} + i_t g_t is an elementwise scan. The recurrence runs on one
thread: a batch-1 step is a matrix-vector product, which more threads only slow down (by 4-20x
on a loaded 2-core machine, from OpenMP's barriers).

Then simple features of the text (FEATURES; rules in docs/visualize.md) are correlated with every
cell (Pearson r), and `rank_cells` orders the cells by |r| for each feature.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from charlm.model import CharLM

TOP = 5  # alternatives kept per position
MAX_CHARS = 100_000  # the most characters one visualization takes (memory: ~16 KB per char at 2x512)
_FUNCTIONAL = {"lstm": torch.lstm, "gru": torch.gru, "rnn": torch.rnn_tanh}


# ---------------------------------------------------------------------------------------------
# the trace


@dataclass
class Trace:
    """Per-position predictions and states of one model over one text (n characters)."""

    text: str
    ids: np.ndarray  # (n,) vocab ids
    prob: np.ndarray  # (n,) float32: p(text[t] | text[:t]); NaN at t = 0
    top_ids: np.ndarray  # (n, TOP) int64: the most likely characters at t, best first (-1 at t = 0)
    top_p: np.ndarray  # (n, TOP) float32: their probabilities (0 at t = 0)
    acts: np.ndarray  # (n, K) float32: every cell, layer by layer, h then tanh(c) within a layer
    labels: list[tuple[int, str, int]]  # each column's (layer, "h"|"c", index)

    def state(self, layer: int, kind: str) -> np.ndarray:
        """(n, H) view of one layer's h or tanh(c)."""
        cols = [k for k, (lay, kd, _) in enumerate(self.labels) if lay == layer and kd == kind]
        if not cols:
            raise KeyError(f"no state {kind!r} in layer {layer}")
        return self.acts[:, cols[0] : cols[-1] + 1]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cell_scan(gates: torch.Tensor, c0: torch.Tensor) -> np.ndarray:
    """c_t = f_t c_{t-1} + i_t g_t over gates (T, 4H) in torch's i, f, g, o order -> (T, H) c."""
    i, f, g, _ = gates.chunk(4, dim=1)
    u = (torch.sigmoid(i) * torch.tanh(g)).numpy()
    f = torch.sigmoid(f).numpy()
    out = np.empty_like(u)
    c = c0.numpy().copy()
    for t in range(len(u)):  # elementwise only: ~2 us a step
        np.multiply(f[t], c, out=c)
        c += u[t]
        out[t] = c
    return out


@torch.no_grad()
def trace(model: CharLM, ids: np.ndarray | torch.Tensor, text: str = "", top: int = TOP) -> Trace:
    """Run `model` over ids as one stream from a zero state, as its eval forward does (no dropout:
    the layers are called with train=False; the model's own mode is left as it is); see the
    module doc."""
    cfg = model.config
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
    if x.ndim != 1 or len(x) < 1:
        raise ValueError("trace needs a non-empty 1-D sequence of ids")
    fn = _FUNCTIONAL[cfg.cell]
    weights = model.rnn._flat_weights
    inp = model.embed(x).unsqueeze(1).float()  # (T, 1, E): time-major, batch 1
    H = cfg.hidden_size
    kinds = ("h", "c") if cfg.cell == "lstm" else ("h",)
    labels = [(layer, kind, i) for layer in range(cfg.num_layers) for kind in kinds for i in range(H)]
    acts = np.empty((len(x), len(labels)), dtype=np.float32)
    col = 0
    for layer in range(cfg.num_layers):
        w_ih, w_hh, b_ih, b_hh = weights[4 * layer : 4 * layer + 4]
        zero = torch.zeros(1, 1, H, device=device)
        hx = (zero, zero) if cfg.cell == "lstm" else zero
        with _threads(1) if device.type == "cpu" else contextlib.nullcontext():
            out = fn(inp, hx, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, False)[0]
        h = out[:, 0]  # (T, H)
        acts[:, col : col + H] = h.cpu().numpy()
        col += H
        if cfg.cell == "lstm":
            h_prev = torch.cat([zero[0], h[:-1]])
            gates = torch.addmm(b_ih + b_hh, inp[:, 0], w_ih.t()).addmm_(h_prev, w_hh.t())
            acts[:, col : col + H] = np.tanh(_cell_scan(gates.cpu(), zero[0, 0].cpu()))
            col += H
        inp = out
    logp = torch.log_softmax(model.head(inp[:, 0]).float(), dim=-1)  # (T, V): predicts t + 1
    n, k = len(x), min(top, cfg.vocab_size)
    prob = np.full(n, np.nan, dtype=np.float32)
    top_ids = np.full((n, top), -1, dtype=np.int64)
    top_p = np.zeros((n, top), dtype=np.float32)
    if n > 1:
        prob[1:] = logp[:-1].gather(1, x[1:, None])[:, 0].exp().cpu().numpy()
        tp, ti = logp[:-1].topk(k, dim=1)
        top_ids[1:, :k] = ti.cpu().numpy()
        top_p[1:, :k] = tp.exp().cpu().numpy()
    return Trace(text, np.asarray(x.cpu()), prob, top_ids, top_p, acts, labels)


# ---------------------------------------------------------------------------------------------
# features of the text: each a pure function str -> (n,) float32, the value after reading text[t]

OPEN_BRACKETS, CLOSE_BRACKETS = "([{", ")]}"


def in_quote(text: str) -> np.ndarray:
    """1 inside a prose quotation: '"' toggles, '“' opens, '”' closes; the opening mark is inside,
    the closing one outside. Runs across lines."""
    out = np.zeros(len(text), dtype=np.float32)
    inside = False
    for t, ch in enumerate(text):
        if ch == '"':
            inside = not inside
        elif ch == "“":
            inside = True
        elif ch == "”":
            inside = False
        out[t] = inside
    return out


def bracket_depth(text: str) -> np.ndarray:
    """Open ( [ { minus closed ) ] } so far, never below 0 (all characters count, strings too)."""
    out = np.zeros(len(text), dtype=np.float32)
    depth = 0
    for t, ch in enumerate(text):
        if ch in OPEN_BRACKETS:
            depth += 1
        elif ch in CLOSE_BRACKETS and depth:
            depth -= 1
        out[t] = depth
    return out


def in_brackets(text: str) -> np.ndarray:
    """1 where bracket_depth > 0."""
    return (bracket_depth(text) > 0).astype(np.float32)


def line_length(text: str) -> np.ndarray:
    """Characters read since the last newline (0 at the newline itself: a new line starts)."""
    out = np.zeros(len(text), dtype=np.float32)
    col = 0
    for t, ch in enumerate(text):
        col = 0 if ch == "\n" else col + 1
        out[t] = col
    return out


def position_in_line(text: str) -> np.ndarray:
    """line_length / the whole line's length (its newline excluded): 0 -> 1 along each line, 0 at
    newlines. Unlike the other features it reads ahead, to the end of the line."""
    col = line_length(text)
    out = np.zeros(len(text), dtype=np.float32)
    start = 0
    for end in [*(i for i, ch in enumerate(text) if ch == "\n"), len(text)]:
        if end > start:
            out[start:end] = col[start:end] / (end - start)
        start = end + 1
    return out


def indentation(text: str) -> np.ndarray:
    """Width of the current line's leading whitespace read so far (space 1, tab to the next
    multiple of 8, as Python counts it); it holds for the rest of the line; 0 at newlines."""
    out = np.zeros(len(text), dtype=np.float32)
    width, leading = 0, True
    for t, ch in enumerate(text):
        if ch == "\n":
            width, leading = 0, True
        elif leading and ch == " ":
            width += 1
        elif leading and ch == "\t":
            width = (width // 8 + 1) * 8
        else:
            leading = False
        out[t] = width
    return out


def after_newline(text: str) -> np.ndarray:
    """1 where the character just read is a newline."""
    return (np.frombuffer(text.encode("utf-32-le"), dtype="<u4") == 10).astype(np.float32)


def python_lexical(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(in_string, in_comment) under Python-ish rules, one left-to-right pass:
    outside strings '#' starts a comment that ends before the newline; ' or " starts a string,
    tripled (''' or \"\"\") a triple-quoted one that runs until the same three quotes; a
    single-quoted string ends at its quote or at a newline (unterminated); a backslash in a string
    escapes the next character (raw strings alike: r"\\"" is one string in Python too). String
    prefixes and f-string braces are ordinary characters. Opening delimiters are inside, the last
    character of a closing one is outside (the value after reading it)."""
    n = len(text)
    s = np.zeros(n, dtype=np.float32)
    c = np.zeros(n, dtype=np.float32)
    t = 0
    while t < n:
        ch = text[t]
        if ch == "#":
            end = text.find("\n", t)
            end = n if end < 0 else end
            c[t:end] = 1
            t = end
        elif ch in "'\"":
            triple = text.startswith(ch * 3, t)
            delim = ch * 3 if triple else ch
            j = t + len(delim)
            while j < n:
                if text[j] == "\\":
                    j += 2
                elif text.startswith(delim, j):
                    j += len(delim) - 1  # the last closing character
                    break
                elif text[j] == "\n" and not triple:
                    break  # unterminated: the newline is outside
                else:
                    j += 1
            j = min(j, n)
            s[t:j] = 1
            t = j + 1 if j < n and text[j] != "\n" else j
        else:
            t += 1
    return s, c


def in_string(text: str) -> np.ndarray:
    """Inside a Python string literal (python_lexical)."""
    return python_lexical(text)[0]


def in_comment(text: str) -> np.ndarray:
    """Inside a Python comment (python_lexical)."""
    return python_lexical(text)[1]


# name -> (title, extractor); code features last
FEATURES: dict[str, tuple[str, Callable[[str], np.ndarray]]] = {
    "in_quote": ("inside a quotation", in_quote),
    "in_brackets": ("inside brackets", in_brackets),
    "bracket_depth": ("bracket depth", bracket_depth),
    "position_in_line": ("position in line", position_in_line),
    "line_length": ("line length so far", line_length),
    "indentation": ("indentation depth", indentation),
    "after_newline": ("after a newline", after_newline),
    "in_string": ("inside a string literal (code)", in_string),
    "in_comment": ("inside a comment (code)", in_comment),
}


def features(text: str) -> dict[str, np.ndarray]:
    """Every feature of FEATURES over text, by name."""
    lexical = python_lexical(text)
    got = {name: fn(text) for name, (_, fn) in FEATURES.items() if fn not in (in_string, in_comment)}
    got["in_string"], got["in_comment"] = lexical
    return {name: got[name] for name in FEATURES}


# ---------------------------------------------------------------------------------------------
# ranking cells


def correlations(feats: dict[str, np.ndarray], acts: np.ndarray) -> dict[str, np.ndarray | None]:
    """Pearson r of each feature with each column of acts (n, K); None for a feature constant over
    this text. A constant cell gets r = 0."""
    n = acts.shape[0]
    mean = acts.mean(axis=0, dtype=np.float64)
    sq = np.einsum("nk,nk->k", acts, acts, dtype=np.float64) / n
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    out: dict[str, np.ndarray | None] = {}
    for name, f in feats.items():
        f = f.astype(np.float64)
        fc = f - f.mean()
        fs = math.sqrt(float(fc @ fc) / n)
        if fs < 1e-9:
            out[name] = None
            continue
        cov = (fc.astype(np.float32) @ acts).astype(np.float64) / n  # mean-centred f: E[fc a]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(std > 1e-6, cov / (fs * std), 0.0)
        out[name] = np.clip(r, -1.0, 1.0)
    return out


@dataclass(frozen=True)
class Cell:
    layer: int
    kind: str  # "h" or "c" (tanh of the cell state)
    index: int
    r: float

    def to_dict(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "cell": self.index, "r": round(self.r, 4)}

    @property
    def name(self) -> str:
        return f"L{self.layer} {self.kind}{self.index}"


def rank_cells(
    corr: dict[str, np.ndarray | None], labels: list[tuple[int, str, int]], best: int = 5
) -> dict[str, list[Cell]]:
    """Each feature's `best` cells by |r|, best first (empty for a constant feature)."""
    ranked: dict[str, list[Cell]] = {}
    for name, r in corr.items():
        if r is None:
            ranked[name] = []
            continue
        order = np.argsort(-np.abs(r), kind="stable")[:best]
        ranked[name] = [Cell(*labels[k], float(r[k])) for k in order]
    return ranked


def random_cells(
    corr: dict[str, np.ndarray | None], labels: list[tuple[int, str, int]], count: int = 8, seed: int = 0
) -> list[dict]:
    """A seeded random sample of cells with their r for every feature: the contrast to the best."""
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(labels), size=min(count, len(labels)), replace=False).tolist())
    out = []
    for k in picks:
        layer, kind, index = labels[k]
        rs = {name: (None if r is None else round(float(r[k]), 4)) for name, r in corr.items()}
        out.append({"layer": layer, "kind": kind, "cell": index, "r": rs})
    return out


@dataclass
class Analysis:
    """A trace, its text's features, and the cells ranked for each feature."""

    trace: Trace
    feats: dict[str, np.ndarray]
    corr: dict[str, np.ndarray | None]
    labels: list[tuple[int, str, int]]
    best: dict[str, list[Cell]]
    sample: list[dict]

    def summary(self) -> dict:
        """JSON-able: per feature its title and best cells (or that it is constant here), the random
        sample, and the mean confidence."""
        p = self.trace.prob[1:]
        return {
            "chars": len(self.trace.text),
            "cells": len(self.labels),
            "bpc": round(float(-np.log2(np.maximum(p, 1e-30)).mean()), 4) if len(p) else None,
            "features": {
                name: {
                    "title": FEATURES[name][0],
                    "constant": self.corr[name] is None,
                    "best": [c.to_dict() for c in self.best[name]],
                }
                for name in FEATURES
            },
            "random_cells": self.sample,
        }


def analyze(model: CharLM, ids: np.ndarray, text: str, best: int = 5, sample: int = 8) -> Analysis:
    """trace + features + correlations + ranking, for one text."""
    if len(text) != len(ids):
        raise ValueError(f"text has {len(text)} characters but {len(ids)} ids")
    tr = trace(model, ids, text)
    feats = features(text)
    corr = correlations(feats, tr.acts)
    return Analysis(
        tr, feats, corr, tr.labels, rank_cells(corr, tr.labels, best), random_cells(corr, tr.labels, sample)
    )
