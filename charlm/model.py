"""The character model: embedding -> multi-layer LSTM | GRU | RNN -> linear head.

The recurrent part is torch's fused nn.LSTM / nn.GRU / nn.RNN (oneDNN on CPU, cuDNN on GPU), so
checkpoints hold the standard parameter names (rnn.weight_ih_l0, ...). Dropout follows char-rnn:
between layers and on the top layer's output before the head. `weight_drop` adds AWD-LSTM's
DropConnect on each layer's hidden-to-hidden weights: one mask per forward (per batch), shared by
every time step, so the recurrence itself is regularised while the fused kernels still run it.

On CPU the layers are run one at a time through the same fused kernels so that dropout between
them can use a cheap uint8-threshold mask: torch's bernoulli_ draws one double per element and
cost ~40 ms per (64, 100, 512) mask here, about a tenth of a whole 2x512 training step; the
bytes come four to a random int32 draw (~3 ms per such mask against ~9 ms one byte per draw).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import ModelConfig

State = tuple[torch.Tensor, ...]  # LSTM: (h, c); GRU/RNN: (h,); each (L, B, H)

_RNN = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
_FUNCTIONAL = {"lstm": torch.lstm, "gru": torch.gru, "rnn": torch.rnn_tanh}


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with the drop probability quantised to 1/256 on CPU (0.5 is exact)."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    thresh = round(p * 256)
    keep = 1.0 - thresh / 256
    # Uniform bytes, four per draw: one full-range int32 draw costs about as much as one byte's.
    n = x.numel()
    words = torch.randint(-(2**31), 2**31, ((n + 3) // 4,), dtype=torch.int32)
    mask = words.view(torch.uint8)[:n].view(x.shape) >= thresh
    return x * mask.to(x.dtype).mul_(1.0 / keep)


class CharLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        V, E, H, L = config.vocab_size, config.embed_size, config.hidden_size, config.num_layers
        self.embed = nn.Embedding(V, E)
        # The module keeps dropout p for its cuDNN path; the CPU path applies it itself.
        self.rnn = _RNN[config.cell](E, H, L, dropout=config.dropout if L > 1 else 0.0)
        self.head = nn.Linear(H, V)
        # torch's default init is kept on purpose: char-rnn's forget-gate bias of 1 learned slower
        # and ended 0.036 nats/char behind in the 10-minute benchmark (docs/benchmarks.md, run AH).

    @property
    def n_state(self) -> int:
        return 2 if self.config.cell == "lstm" else 1

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in range(self.n_state))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T) ids -> logits (B, T, V) and the state after the last step."""
        B = x.shape[0]
        if state is None:
            state = self.init_state(B, x.device)
        emb = self.embed(x.t())  # (T, B, E): time-major is the fused kernels' native layout
        per_layer = x.device.type == "cpu" and self.config.num_layers > 1
        if self.training and (per_layer or self.config.weight_drop > 0):
            out, state = self._forward_layers(emb, state)
        else:
            hx = state if self.n_state == 2 else state[0]
            out, new = self.rnn(emb, hx)  # (T, B, H)
            state = tuple(new) if self.n_state == 2 else (new,)
        out = fast_dropout(out, self.config.dropout, self.training)
        logits = self.head(out)  # (T, B, V)
        return logits.transpose(0, 1), state

    def _forward_layers(self, inp: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        fn = _FUNCTIONAL[self.config.cell]
        weights = self.rnn._flat_weights
        finals: list[list[torch.Tensor]] = [[] for _ in state]
        for layer in range(self.config.num_layers):
            if layer > 0:
                inp = fast_dropout(inp, self.config.dropout, True)
            params = weights[4 * layer : 4 * layer + 4]
            if self.config.weight_drop > 0:
                # (G*H, H) recurrent weights, G gates: dropped connections stay dropped all batch
                params = [params[0], fast_dropout(params[1], self.config.weight_drop, True), *params[2:]]
            hx = tuple(s[layer : layer + 1] for s in state)
            # torch.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidir, batch_first)
            res = fn(inp, hx if self.n_state == 2 else hx[0], params, True, 1, 0.0, True, False, False)
            inp = res[0]
            for i, s in enumerate(res[1:]):
                finals[i].append(s)
        return inp, tuple(torch.cat(f, 0) for f in finals)


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
