"""Batched sampling: N streams advance together, one step per character for all of them.

Speed: the per-step path does not go through nn.LSTM (whose per-call overhead is milliseconds on
CPU). Layer 0's input projection is precomputed for every character (a (V, 4H) table, so it is a
row gather), each weight is cast once to the compute dtype and, on CPU, pre-packed for oneDNN.
With bf16 the gates are computed in bf16 (the GEMMs produce bf16 anyway) while the LSTM cell
state, which accumulates over thousands of steps, stays fp32. Upper LSTM/RNN layers run
[x, h] @ [W_ih; W_hh]^T as one GEMM.

Randomness: a sample is drawn as argmax(logits / temperature + Gumbel noise), where the noise for
(stream id, step, character) is a counter-based hash of the seed. A stream's text therefore
depends only on (seed, stream id, prompt), never on which other streams share its batch or how
a job is split across workers. top-k / top-p mask logits to -inf first, which makes the Gumbel
draw an exact sample from the renormalised truncated distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from charlm.model import CharLM
from charlm.train import resolve_precision
from charlm.vocab import Vocab

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32  # int64 products wrap; the low 32 bits are still exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


class _Linear:
    """y = x @ W^T + b in the compute dtype, with oneDNN-prepacked weights on CPU when available."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, batch: int
    ) -> None:
        self.w = weight.detach().to(dtype).contiguous()
        self.b = bias.detach().to(dtype) if bias is not None else None
        self.packed = None
        if self.w.device.type == "cpu":
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w, batch)
                self(torch.zeros(batch, self.w.shape[1], dtype=dtype))  # probe once
            except (AttributeError, RuntimeError):
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
        return torch.nn.functional.linear(x, self.w, self.b)


class Sampler:
    """Prepared, read-only view of a model for fast generation. Reuse it across calls."""

    def __init__(
        self,
        model: CharLM,
        vocab: Vocab,
        *,
        precision: str = "auto",
        device: torch.device | str | None = None,
        max_batch: int = 256,
    ) -> None:
        if model.config.vocab_size != len(vocab):
            raise ValueError(f"model has {model.config.vocab_size} outputs, vocab {len(vocab)} characters")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.cfg = model.config
        self.precision = resolve_precision(precision, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self._built_for: int | None = None
        self._build(max_batch)
        counts = torch.tensor(vocab.counts or [1] * len(vocab), dtype=torch.float64)
        self._unigram = torch.log(counts / counts.sum()).float().to(self.device)
        self._vkey = _mix32(torch.arange(len(vocab), dtype=torch.int64, device=self.device) + 0x68E31DA4)

    @torch.no_grad()
    def _build(self, batch: int) -> None:
        rnn, L, dt, cell = self.model.rnn, self.cfg.num_layers, self.dtype, self.cfg.cell
        w = {name: p.detach().float() for name, p in rnn.named_parameters()}
        # Layer 0's input projection for every character: (V, E) @ (E, G) -> (V, G), G = gates*H.
        emb = self.model.embed.weight.detach().float()
        table = emb @ w["weight_ih_l0"].t() + w["bias_ih_l0"]
        if cell != "gru":  # LSTM/RNN add both biases to the same pre-activation: fold b_hh in
            table += w["bias_hh_l0"]
            self.hh0 = _Linear(w["weight_hh_l0"], None, dt, batch)
        else:
            self.hh0 = _Linear(w["weight_hh_l0"], w["bias_hh_l0"], dt, batch)
        self.table0 = table.to(dt)
        # Upper layers: LSTM/RNN run [x, h] @ [W_ih; W_hh]^T as one GEMM (K = 2H); GRU needs
        # the two products apart (r gates only the recurrent part of n).
        self.upper: list[tuple[_Linear, _Linear | None]] = []
        for k in range(1, L):
            wi, wh, bi, bh = (w[f"{n}_l{k}"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            if cell == "gru":
                self.upper.append((_Linear(wi, bi, dt, batch), _Linear(wh, bh, dt, batch)))
            else:
                self.upper.append((_Linear(torch.cat([wi, wh], 1), bi + bh, dt, batch), None))
        self.head = _Linear(self.model.head.weight.float(), self.model.head.bias.float(), dt, batch)
        self._built_for = batch

    def _step(self, tok: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """One character for every stream. tok: (N,) ids; state: per layer h (compute dtype, the
        GEMM input) and for LSTM c (fp32, it accumulates), each (N, H). Updates state in place;
        returns logits (N, V) fp32."""
        cell, H = self.cfg.cell, self.cfg.hidden_size
        x = None
        for k in range(self.cfg.num_layers):
            h = state[2 * k] if cell == "lstm" else state[k]
            if k == 0:
                pre = self.table0.index_select(0, tok)  # (N, G)
                gh = self.hh0(h)
            elif cell == "gru":
                ih, hh = self.upper[k - 1]
                pre, gh = ih(x), hh(h)
            else:
                pre, gh = self.upper[k - 1][0](torch.cat([x, h], 1)), None
            if cell == "lstm":
                g = pre.add_(gh) if gh is not None else pre  # (N, 4H): i, f, g, o
                a = torch.sigmoid(g)
                gg = torch.tanh(g[:, 2 * H : 3 * H])
                c = torch.addcmul(a[:, H : 2 * H] * state[2 * k + 1], a[:, :H], gg)  # fp32
                h = (a[:, 3 * H :] * torch.tanh(c)).to(self.dtype)
                state[2 * k], state[2 * k + 1] = h, c
            elif cell == "gru":
                rz = torch.sigmoid(pre[:, : 2 * H] + gh[:, : 2 * H])  # (N, 2H): r, z
                n = torch.tanh(torch.addcmul(pre[:, 2 * H :], rz[:, :H], gh[:, 2 * H :]))
                h = torch.lerp(n.float(), h.float(), rz[:, H:].float()).to(self.dtype)  # (1-z)n + zh
                state[k] = h
            else:
                h = torch.tanh(pre.add_(gh) if gh is not None else pre)
                state[k] = h
            x = h
        return self.head(x).float()

    def _zero_state(self, n: int) -> list[torch.Tensor]:
        """Per layer: h (N, H) in the GEMM dtype, and for LSTM c (N, H) fp32."""
        out = []
        for _ in range(self.cfg.num_layers):
            out.append(torch.zeros(n, self.cfg.hidden_size, dtype=self.dtype, device=self.device))
            if self.cfg.cell == "lstm":
                out.append(torch.zeros(n, self.cfg.hidden_size, device=self.device))
        return out

    def _noise(self, stream_keys: torch.Tensor, gen_step: torch.Tensor) -> torch.Tensor:
        """Gumbel(0, 1) noise (N, V), a pure function of (seed, stream id, step, character)."""
        k = _mix32((stream_keys + gen_step * 0x9E3779B9) & _M32)  # (N,)
        bits = _mix32(k[:, None] ^ self._vkey[None, :]) >> 8  # (N, V), 24 uniform bits
        u = (bits.float() + 0.5) * (1.0 / (1 << 24))  # strictly inside (0, 1)
        return -torch.log(-torch.log(u))

    @staticmethod
    def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
        if top_k and top_k < logits.shape[1]:
            kth = torch.topk(logits, top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=1, descending=True)
            probs = torch.softmax(sorted_logits, dim=1)
            # drop a token when the ones ranked above it already reach top_p (the first is kept)
            drop = (probs.cumsum(1) - probs) >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(1, order, sorted_logits)
        return logits

    def _flush(self, seq, emitted, upto, on_text) -> torch.Tensor:
        for i in (upto > emitted).nonzero().flatten().tolist():
            on_text(i, self.vocab.decode(seq[i, int(emitted[i]) : int(upto[i])].cpu()))
        return torch.maximum(emitted, upto)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        length: int,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: str | None = None,
        stream_ids: Sequence[int] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """Continue each prompt by `length` characters (fewer if `stop` appears; it is cut off).

        prompts: one per stream, any lengths ('' starts from a character drawn from the corpus
        frequencies). stream_ids: a stable id per stream (default 0..N-1) that, with the seed,
        fixes its random draws. on_text(stream, text) receives characters as they are made.
        """
        n = len(prompts)
        if n == 0 or length <= 0:
            return [""] * n
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if n > (self._built_for or 0):
            self._build(n)
        dev = self.device
        ids = torch.tensor(
            list(stream_ids) if stream_ids is not None else range(n), dtype=torch.int64, device=dev
        )
        keys = _mix32((_mix32(ids & _M32) ^ (seed & _M32)) + ((seed >> 32) & _M32) & _M32)
        # Empty prompts start from one character drawn from the unigram distribution (step -1).
        encoded = [
            torch.from_numpy(
                self.vocab.encode(p, where=f"prime text {i + 1}" if n > 1 else "prime text").astype("int64")
            )
            for i, p in enumerate(prompts)
        ]
        empty = torch.tensor([len(e) == 0 for e in encoded], device=dev)
        if bool(empty.any()):
            first = (self._unigram[None, :] + self._noise(keys, torch.full((n,), -1, device=dev))).argmax(1)
            encoded = [e if len(e) else first[i : i + 1].cpu() for i, e in enumerate(encoded)]
        lens = torch.tensor([len(e) for e in encoded], device=dev)  # (N,) prompt lengths >= 1
        lmax = int(lens.max())
        seq = torch.zeros(n, lmax + length, dtype=torch.int64, device=dev)  # prompts, then samples
        for i, e in enumerate(encoded):
            seq[i, : len(e)] = e.to(dev)
        # Prompts run through the same step path as sampling (not the fused sequence kernel), so
        # a stream's numbers, and so its text, never depend on which prompts share its batch.
        state = self._zero_state(n)
        # A stream's text is seq[start:stop_at]: after its prompt, or from 0 for an empty prompt.
        start = torch.where(empty, 0, lens)
        end = start + length
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        stop_ids = None
        if stop:
            try:
                stop_ids = torch.from_numpy(self.vocab.encode(stop).astype("int64")).to(dev)
            except ValueError:
                stop_ids = None  # a stop string the model cannot produce never matches
        stop_at = end.clone()
        emitted = start.clone()  # streaming: seq[i, start[i]:emitted[i]] was handed to on_text
        hold = len(stop_ids) - 1 if stop_ids is not None else 0
        for p in range(lmax + length - 1):
            logits = self._step(seq[:, p], state)  # (N, V): distribution of position p + 1
            pos = p + 1
            if temperature == 0:
                nxt = logits.argmax(1)
            else:
                logits = self._filter(logits / temperature, top_k, top_p)
                nxt = (logits + self._noise(keys, pos - lens)).argmax(1)
            sampling = (pos >= lens) & (pos < end) & ~done
            seq[:, pos] = torch.where(sampling, nxt, seq[:, pos])
            if stop_ids is not None and pos + 1 >= len(stop_ids):
                hit = sampling & (pos + 1 - start >= len(stop_ids))
                hit &= (seq[:, pos + 1 - len(stop_ids) : pos + 1] == stop_ids).all(1)
                stop_at = torch.where(hit, pos + 1 - len(stop_ids), stop_at)
                done |= hit
            if on_text is not None:
                # hold back what could still turn out to be the start of the stop string
                upto = torch.where(done, stop_at, torch.maximum(end.clamp(max=pos + 1 - hold), start))
                emitted = self._flush(seq, emitted, upto, on_text)
            if bool(((pos + 1 >= end) | done).all()):
                break
        if on_text is not None:
            self._flush(seq, emitted, stop_at, on_text)
        out = seq.cpu()
        return [self.vocab.decode(out[i, int(start[i]) : int(stop_at[i])]) for i in range(n)]


def sample(
    model: CharLM,
    vocab: Vocab,
    prompts: Sequence[str] = ("",),
    length: int = 500,
    **kwargs,
) -> list[str]:
    """One-off convenience around Sampler(model, vocab).generate(...)."""
    precision = kwargs.pop("precision", "auto")
    return Sampler(model, vocab, precision=precision, max_batch=max(1, len(prompts))).generate(
        prompts, length, **kwargs
    )
