"""Batched sampling: N streams advance together, one step per character for all of them.

Speed: the per-step path does not go through nn.LSTM (whose per-call overhead is milliseconds on
CPU). Layer 0's input projection is precomputed for every character (a (V, 4H) table, so it is a
row gather), each weight is cast once to the compute dtype and, on CPU, pre-packed for oneDNN.
With bf16 the gates are computed in bf16 (the GEMMs produce bf16 anyway) while the LSTM cell
state, which accumulates over thousands of steps, stays fp32. Upper LSTM/RNN layers run
[x, h] @ [W_ih; W_hh]^T as one GEMM.

Precision: `auto` is the fastest precision the device runs natively (charlm.capability). On an
x86 CPU that is int8 (weights int8 per output row, int32 products, fp32 gates and cell state)
through the fastest kernel whose sums the probe finds exact there: oneDNN's quantized linear
with hidden states as uint8 (127 h + 128) on CPUs with VNNI or AMX, fbgemm's with 7-bit hidden
states on AVX2 and up (AVX2 sums pairs of 8-bit products in int16, which saturates at 8 bits).
On a tinyshakespeare 2x512 both score within 0.0003 nats/char of fp32 (bf16: 0.0001); oneDNN's
runs ~1.3x bf16's speed at 256 streams, fbgemm's 1.6-1.7x fp32's on AVX2
(bench/sample_fidelity.py, bench/sample_throughput.py, docs/benchmarks.md). Elsewhere `auto` is
bf16 where the hardware has it, else fp32.

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
import torch.nn.functional as F

from charlm import capability
from charlm.model import CharLM
from charlm.vocab import Vocab

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32  # int64 products wrap; the low 32 bits are still exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_bits(x: torch.Tensor) -> torch.Tensor:
    """_mix32 on int32 tensors holding the same 32 bits, for the big (N, S, V) noise tensor: int32
    products wrap to the same low 32 bits and run vectorized (AVX2 has no 64-bit multiply, which
    made the int64 form ~5x slower there), and a logical shift is an arithmetic one masked."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - (1 << 32))  # the same multiplier's bits as an int32
    return x ^ ((x >> 16) & 0xFFFF)


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

    def __call__(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, K); base: (N, out) in the compute dtype to add (in place), or None."""
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
        else:
            y = torch.nn.functional.linear(x, self.w, self.b)
        return y if base is None else base.add_(y)


FUSED_INT8 = True  # use oneDNN's fused quantized linear where torch has it (tests turn it off)
NOISE_BLOCK = 32  # steps of Gumbel noise drawn at once (N x 32 x V fp32: 2 MiB at N = 256, V = 65)
ACT7 = 63.5  # fbgemm-avx2: a hidden state h in [-1, 1] is held as round(63.5 h) + 64, 7 bits


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, K) weights -> int8 (out, K) and one fp32 scale per output row (out,), |q| <= 127."""
    w = weight.detach().float()
    row_max = w.abs().amax(1)
    w_scale = torch.where(row_max > 0, row_max / 127.0, torch.ones_like(row_max))
    return torch.round(w / w_scale[:, None]).clamp_(-127, 127).to(torch.int8), w_scale


class _Fbgemm7Linear:
    """y = x @ W^T + b through fbgemm's int8 GEMM, for CPUs without 8-bit dot products (AVX2).

    AVX2's vpmaddubsw sums each pair of u8 x s8 products in int16, which saturates for 8-bit
    inputs (2 x 255 x 127 > 32767). Here the input x in [-1, 1] is quantized inside the op at a
    fixed scale to 7 bits, q = round(63.5 x) + 64 in [0, 128], so a pair is at most
    2 x 128 x 127 = 32512 and every int32 sum is exact (capability._fbgemm_int8_exact checks
    this). W is int8 with one scale per output row. x and the result are fp32 (N, K) -> (N, out);
    the quantization is per element at a fixed scale, so a row's result depends on that row only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        wq, w_scale = _quantize_rows(weight)
        b = bias.detach().float().contiguous() if bias is not None else None
        self.packed = capability.fbgemm_linear_prepack(wq, w_scale, b)

    def __call__(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, K) fp32 in [-1, 1]; base: (N, out) fp32 to add (in place), or None."""
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1.0 / ACT7, 64, self.packed)
        return y if base is None else base.add_(y)


class _Int8Linear:
    """y = x @ W^T + b for x in [-1, 1] (every GEMM input in the sampler is a hidden state, which
    tanh/sigmoid bound to [-1, 1]) held as uint8 q = round(127 x) + 128, and W as int8 with one
    scale per output row. Returns fp32 (N, out), plus `base` (N, out) fp32 when given.

    fused: oneDNN's quantized linear (u8 x s8, VNNI's native pair), with the rescale, bias and
    the add of `base` in the GEMM's epilogue, when this torch has it; else torch._int_mm (s8 x s8,
    exact int32) and one addcmul. The kernel is fixed per layer, never chosen by batch size, so a
    row's result depends on that row alone (a stream's numbers cannot depend on its batch).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch: int, fused: bool) -> None:
        wq, w_scale = _quantize_rows(weight)
        self.b = bias.detach().float() if bias is not None else None
        self.packed = None
        if fused:
            try:
                self.w_scale, self.w_zero = w_scale, torch.zeros(len(w_scale), dtype=torch.int64)
                self.packed = torch.ops.onednn.qlinear_prepack(wq, [batch, wq.shape[1]])
                self(torch.full((batch, wq.shape[1]), 128, dtype=torch.uint8))  # probe once
            except (AttributeError, RuntimeError, NotImplementedError):
                self.packed = None
        self.w = wq.t()  # (K, out) view of (out, K): the layout _int_mm runs fastest
        self.scale = w_scale / 127.0  # folds in the input's 1/127

    def __call__(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, K) uint8; base: (N, out) fp32 to add (consumed), or None."""
        if self.packed is not None:
            args = (x, 1.0 / 127.0, 128, self.packed, self.w_scale, self.w_zero)
            if base is None:
                return torch.ops.onednn.qlinear_pointwise(
                    *args, self.b, 1.0, 0, torch.float32, "none", [], ""
                )
            return torch.ops.onednn.qlinear_pointwise.binary(
                *args, base, self.b, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], ""
            )
        acc = torch._int_mm(x.view(torch.int8) ^ -128, self.w)  # q - 128 by flipping the top bit
        if self.b is not None:
            base = self.b if base is None else base.add_(self.b)
        # the int32 -> fp32 conversion, rescale and add in one call
        return torch.addcmul(base, acc, self.scale) if base is not None else acc * self.scale


Linear = _Linear | _Int8Linear | _Fbgemm7Linear


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
        int8_kernel: str | None = None,
    ) -> None:
        """precision: auto | fp32 | bf16 | int8 (capability.resolve: auto is the fastest native
        one). int8_kernel: None for the fastest exact one here, or one of
        capability.probe().int8_kernels (benchmarks and tests compare them)."""
        if model.config.vocab_size != len(vocab):
            raise ValueError(f"model has {model.config.vocab_size} outputs, vocab {len(vocab)} characters")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.cfg = model.config
        # refuses an unknown precision, and in one line one this device does not run natively
        self.precision = capability.resolve(precision, self.device, "sample")
        kernels = capability.probe(self.device).int8_kernels
        if int8_kernel is not None and self.precision == "int8" and int8_kernel not in kernels:
            raise capability.PrecisionUnavailable(
                f"int8 kernel {int8_kernel} is not exact on this CPU; exact here: {', '.join(kernels)}"
            )
        # "onednn-vnni" holds hidden states as uint8 for oneDNN; "fbgemm-avx2" takes them fp32
        self.int8_kernel = (int8_kernel or kernels[0]) if self.precision == "int8" else None
        # dtype of the hidden states, which are the GEMM inputs; int8 holds them as uint8 127 h + 128
        self.dtype = {"bf16": torch.bfloat16, "int8": torch.uint8}.get(self.precision, torch.float32)
        if self.int8_kernel == "fbgemm-avx2":
            self.dtype = torch.float32
        self._half_up = torch.tensor(128.5, device=self.device)
        self._built_for: int | None = None
        self._build(max_batch)
        counts = torch.tensor(vocab.counts or [1] * len(vocab), dtype=torch.float64)
        self._unigram = torch.log(counts / counts.sum()).float().to(self.device)
        vkey = _mix32(torch.arange(len(vocab), dtype=torch.int64, device=self.device) + 0x68E31DA4)
        self._vkey = vkey.to(torch.uint32).view(torch.int32)  # the same 32 bits, as int32

    @torch.no_grad()
    def _build(self, batch: int) -> None:
        rnn, L, H, cell = self.model.rnn, self.cfg.num_layers, self.cfg.hidden_size, self.cfg.cell
        int8 = self.dtype == torch.uint8
        gate_dtype = torch.float32 if int8 else self.dtype  # int8 GEMMs return fp32

        def linear(weight: torch.Tensor, bias: torch.Tensor | None, head: bool = False) -> Linear:
            if int8:
                # the head is small: _int_mm's lower per-call cost beats oneDNN's fused kernel there
                return _Int8Linear(weight, bias, batch, fused=FUSED_INT8 and not head)
            if self.int8_kernel == "fbgemm-avx2":
                # the head too: fp32 GEMMs round differently by batch size (MKL's and oneDNN's
                # kernels are chosen by M), exact int8 sums never do
                return _Fbgemm7Linear(weight, bias)
            return _Linear(weight, bias, gate_dtype, batch)

        w = {name: p.detach().float() for name, p in rnn.named_parameters()}
        # torch's CPU tanh cost 4-7x its sigmoid on the AMD EPYC this was tuned on (on an AMX
        # Xeon fp32 tanh is the cheaper one: the best choice depends on the CPU), so the step
        # computes tanh(x) as 2 sigmoid(2x) - 1: for an LSTM's c (fp32) always; for the
        # pre-activations that go through tanh (LSTM's g, GRU's n, RNN's all) when the gates are
        # fp32, by doubling their rows here. (In bf16, 2 sigmoid - 1 would lose tanh's relative
        # precision near 0.)
        self._sigmoid_tanh = gate_dtype == torch.float32
        if self._sigmoid_tanh:
            gates = w["weight_hh_l0"].shape[0] // H  # LSTM 4: i, f, g, o; GRU 3: r, z, n; RNN 1
            gscale = torch.ones(gates * H, device=self.device)
            tanh_rows = slice(0, H) if cell == "rnn" else slice(2 * H, 3 * H)  # RNN's h, LSTM's g, GRU's n
            gscale[tanh_rows] = 2.0
            for name in list(w):
                w[name] = w[name] * (gscale[:, None] if w[name].dim() == 2 else gscale)
        # Layer 0's input projection for every character: (V, E) @ (E, G) -> (V, G), G = gates*H.
        emb = self.model.embed.weight.detach().float()
        table = emb @ w["weight_ih_l0"].t() + w["bias_ih_l0"]
        if cell != "gru":  # LSTM/RNN add both biases to the same pre-activation: fold b_hh in
            table += w["bias_hh_l0"]
            self.hh0 = linear(w["weight_hh_l0"], None)
        else:
            self.hh0 = linear(w["weight_hh_l0"], w["bias_hh_l0"])
        self.table0 = table.to(gate_dtype)
        # Upper layers: LSTM/RNN run [x, h] @ [W_ih; W_hh]^T as one GEMM (K = 2H); GRU needs
        # the two products apart (r gates only the recurrent part of n).
        self.upper: list[tuple[Linear, Linear | None]] = []
        for k in range(1, L):
            wi, wh, bi, bh = (w[f"{n}_l{k}"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            if cell == "gru":
                self.upper.append((linear(wi, bi), linear(wh, bh)))
            else:
                self.upper.append((linear(torch.cat([wi, wh], 1), bi + bh), None))
        self.head = linear(self.model.head.weight.float(), self.model.head.bias.float(), head=True)
        self._built_for = batch

    def _store(self, h: torch.Tensor) -> torch.Tensor:
        """A fresh fp32/bf16 hidden state (N, H) -> the GEMM input dtype (int8: 127 h + 128)."""
        if self.dtype == torch.uint8:  # the cast floors, and 127 h + 128.5 > 0: floor = round
            return h.mul_(127.0).add_(128.5).to(torch.uint8)
        return h.to(self.dtype)

    def _store_lstm(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """h = o * tanh(c) = o * (2u - 1) for u = sigmoid(2c), stored in the GEMM input dtype."""
        if self.dtype == torch.uint8:  # 127 h + 128.5, floored by the cast: 127 h + 128 rounded
            return torch.addcmul(self._half_up, o, u.mul_(254.0).sub_(127.0)).to(torch.uint8)
        return torch.addcmul(-o, o, u, value=2.0).to(self.dtype)

    def _tanh(self, x: torch.Tensor) -> torch.Tensor:
        """tanh of a pre-activation whose rows _build doubled when the gates are fp32."""
        return torch.sigmoid(x).mul_(2.0).sub_(1.0) if self._sigmoid_tanh else torch.tanh(x)

    def _load(self, h: torch.Tensor) -> torch.Tensor:
        """A stored hidden state -> fp32 values."""
        return (h.float() - 128.0) * (1.0 / 127.0) if self.dtype == torch.uint8 else h.float()

    def _step(self, tok: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """One character for every stream. tok: (N,) ids; state: per layer h (the GEMM input dtype)
        and for LSTM 2c (fp32, it accumulates), each (N, H). Updates state in place; returns
        logits (N, V) fp32."""
        cell, H = self.cfg.cell, self.cfg.hidden_size
        x = None
        for k in range(self.cfg.num_layers):
            h = state[2 * k] if cell == "lstm" else state[k]
            if cell == "gru":
                ih, hh = (None, self.hh0) if k == 0 else self.upper[k - 1]
                pre = torch.nn.functional.embedding(tok, self.table0) if k == 0 else ih(x)  # (N, 3H)
                gh = hh(h)  # (N, 3H)
                rz = torch.sigmoid(pre[:, : 2 * H] + gh[:, : 2 * H])  # (N, 2H): r, z
                n = self._tanh(torch.addcmul(pre[:, 2 * H :], rz[:, :H], gh[:, 2 * H :]))  # (N, H)
                h = self._store(torch.lerp(n.float(), self._load(h), rz[:, H:].float()))  # (1-z)n + zh
                state[k] = h
                x = h
                continue
            if k == 0:  # the gathered input projection plus h @ W_hh^T
                g = self.hh0(h, torch.nn.functional.embedding(tok, self.table0))  # (N, G)
            else:
                g = self.upper[k - 1][0](torch.cat([x, h], 1))
            if cell == "lstm":
                # The state holds c2 = 2c, and tanh(c) = 2 sigmoid(c2) - 1: one sigmoid, no tanh.
                gates = torch.sigmoid(g)  # (N, 4H); slices cost less than chunk's split
                i, f, gg, o = (gates[:, j * H : (j + 1) * H] for j in range(4))  # each (N, H)
                c2 = f * state[2 * k + 1]  # fp32
                if self._sigmoid_tanh:  # g's rows were doubled: 2 tanh(g) = 4 sigmoid(2g) - 2
                    c2.sub_(i, alpha=2.0).addcmul_(i, gg, value=4.0)
                else:
                    c2.addcmul_(i, torch.tanh(g[:, 2 * H : 3 * H]), value=2.0)
                h = self._store_lstm(o, torch.sigmoid(c2))
                state[2 * k], state[2 * k + 1] = h, c2
            else:  # rnn
                h = self._store(self._tanh(g))
                state[k] = h
            x = h
        return self.head(x).float()

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean nats/char of targets y (B, T) given inputs x (B, T), teacher-forced through the
        step path generation runs (each of the B streams carries its state along its row): how
        far this precision moves what the model would generate."""
        B, T = x.shape
        if (self._built_for or 0) < B:
            self._build(B)
        state = self._zero_state(B)
        total = torch.zeros((), dtype=torch.float64)
        for t in range(T):
            logits = self._step(x[:, t].to(self.device), state)  # (B, V) fp32
            total += F.cross_entropy(logits, y[:, t].to(self.device), reduction="sum").double().cpu()
        return float(total) / (B * T)

    def _zero_state(self, n: int) -> list[torch.Tensor]:
        """Per layer: h (N, H) in the GEMM input dtype, and for LSTM 2c (N, H) fp32."""
        out = []
        zero = 128 if self.dtype == torch.uint8 else 0
        for _ in range(self.cfg.num_layers):
            out.append(torch.full((n, self.cfg.hidden_size), zero, dtype=self.dtype, device=self.device))
            if self.cfg.cell == "lstm":
                out.append(torch.zeros(n, self.cfg.hidden_size, device=self.device))
        return out

    def _noise(self, stream_keys: torch.Tensor, gen_step: torch.Tensor) -> torch.Tensor:
        """Gumbel(0, 1) noise (..., V) for stream keys and steps of one shape, (N,) or (N, S): a
        pure function of (seed, stream id, step, character)."""
        k = _mix32((stream_keys + gen_step * 0x9E3779B9) & _M32)  # (N,) or (N, S)
        k = k.to(torch.uint32).view(torch.int32)  # the same 32 bits, as int32
        bits = (_mix32_bits(k[..., None] ^ self._vkey) >> 8) & 0xFFFFFF  # (..., V), 24 uniform bits
        u = bits.float().add_(0.5).mul_(1.0 / (1 << 24))  # strictly inside (0, 1)
        return u.log_().neg_().log_().neg_()  # -log(-log(u)), in place

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
    # ~100 lines: the per-step loop is kept in one piece because its cost is per character;
    # every helper call or indirection here is paid once per step for every stream.
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
        # Per-step work is a few ops on small tensors at 1 stream, so what can be is done per
        # run or per block of steps: the sampling window of every position, and the noise.
        positions = torch.arange(lmax + length, device=dev)
        window = (positions >= lens[:, None]) & (positions < end[:, None])  # (N, P): pos is sampled
        last = int(end.max())  # without a stop string every stream ends at its end
        everyone = window.all(0).tolist()  # pos is sampled in every stream (equal prompt lengths)
        noise, noise_at = torch.empty(n, 0, len(self.vocab), device=dev), 0
        for p in range(lmax + length - 1):
            logits = self._step(seq[:, p], state)  # (N, V): distribution of position p + 1
            pos = p + 1
            if temperature == 0:
                nxt = logits.argmax(1)
            else:
                logits = self._filter(logits.div_(temperature), top_k, top_p)  # logits is ours
                if pos - noise_at >= noise.shape[1]:  # the next NOISE_BLOCK steps' noise at once
                    steps = positions[pos : pos + NOISE_BLOCK]  # (S,)
                    noise, noise_at = self._noise(keys[:, None], steps - lens[:, None]), pos  # (N, S, V)
                nxt = logits.add_(noise[:, pos - noise_at]).argmax(1)
            if stop_ids is None and everyone[pos]:
                seq[:, pos] = nxt
            else:
                sampling = window[:, pos] & ~done if stop_ids is not None else window[:, pos]
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
            if pos + 1 >= last or (stop_ids is not None and bool(((pos + 1 >= end) | done).all())):
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
