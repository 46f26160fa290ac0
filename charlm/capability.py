"""What this machine runs natively, found once by running it, and where a figure was measured.

The probe tries a tiny primitive per precision on the device and caches the answer, so a
capability reflects what the libraries actually do here (a capped ISA, a torch built without a
kernel) and not only what the CPU flags promise:

- bf16 (train and sample) on CPU needs oneDNN's bf16 kernels, which exist on CPUs with
  AVX512-BF16 or AMX: elsewhere its LSTM primitive refuses bf16 and its GEMMs emulate it at a
  fraction of fp32's speed. The probe asks oneDNN and then runs a bf16 LSTM forward and backward.
- int8 sampling runs on one of two CPU kernels, tried in this order:
  - "onednn-vnni": oneDNN's quantized linear (u8 x s8, rescale and adds fused in its epilogue).
    Exact only with 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX): without them
    pairs of u8 x s8 products are summed in int16 and saturate. The probe feeds it the largest
    products and keeps it only if the int32 sum comes out exact.
  - "fbgemm-avx2": fbgemm's int8 GEMM with 7-bit activations (reduce_range), so that a pair of
    products, at most 2 x 127 x 127, fits int16 on AVX2's vpmaddubsw. Probed the same way.

The libraries read their ISA caps from the environment when they start: ATEN_CPU_CAPABILITY
(ATen), ONEDNN_MAX_CPU_ISA (oneDNN), MKL_ENABLE_INSTRUCTIONS (MKL), FBGEMM_ENABLE_INSTRUCTIONS
(fbgemm). `CAPS["avx2"]` sets them all to AVX2, so an AVX-512 machine reproduces an AVX2-only one
(scripts/test runs the hardware-dependent tests once more that way).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from charlm.config import PRECISIONS, SAMPLE_PRECISIONS

# Environment that caps every CPU library at one ISA level; set before torch's first kernel runs.
CAPS: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    },
}
CAP_VARS = tuple(sorted({k for env in CAPS.values() for k in env}))

# The CPU features a figure or a precision depends on: our name -> torch.cpu.get_capabilities()'s.
CPU_FLAGS = {
    "avx2": "avx2",
    "fma": "fma3",
    "avx512f": "avx512_f",
    "avx512_bf16": "avx512_bf16",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
}


class PrecisionUnavailable(ValueError):
    """An explicit precision this device cannot run natively; the message is one line."""


def cpu_model() -> str:
    """The CPU's marketing name, as /proc/cpuinfo gives it (platform's answer elsewhere)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    """The features in CPU_FLAGS, as the CPU reports them (before any cap)."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        caps = {}
    return {ours: bool(caps.get(theirs, False)) for ours, theirs in CPU_FLAGS.items()}


def machine_info() -> dict[str, Any]:
    """Where a figure is measured: CPU model, its flags, the caps in force, threads, torch, GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": [name for name, has in cpu_flags().items() if has],
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {k: os.environ[k] for k in CAP_VARS if os.environ.get(k)},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


@dataclass(frozen=True)
class Capabilities:
    """The precisions a device runs natively, and for each one it does not, what is missing."""

    device: str
    train: tuple[str, ...]
    sample: tuple[str, ...]
    # the exact int8 kernels of a CPU, fastest first: "onednn-vnni", "fbgemm-avx2"
    int8_kernels: tuple[str, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def int8_kernel(self) -> str | None:
        """The int8 kernel `auto` samples with, or None."""
        return self.int8_kernels[0] if self.int8_kernels else None

    @property
    def auto_train(self) -> str:
        return "bf16" if "bf16" in self.train else "fp32"

    @property
    def auto_sample(self) -> str:
        """int8 where a CPU has an exact int8 kernel (within 0.0003 nats/char of fp32 and the
        fastest), else bf16 where native, else fp32."""
        if "int8" in self.sample:
            return "int8"
        return "bf16" if "bf16" in self.sample else "fp32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"], d["sample"], d["int8_kernels"] = (
            list(self.train),
            list(self.sample),
            list(self.int8_kernels),
        )
        d["int8_kernel"] = self.int8_kernel
        d["auto"] = {"train": self.auto_train, "sample": self.auto_sample}
        return d


def _cpu_bf16_runs() -> bool:
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        # the probe may first run inside a caller's no_grad or inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            lstm = torch.nn.LSTM(8, 8)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, _ = lstm(torch.randn(3, 2, 8))  # (T, B, H)
            out.float().sum().backward()
        return out.dtype == torch.bfloat16 and lstm.weight_hh_l0.grad is not None
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# The probe's worst case: every product at its largest, so a kernel that sums pairs in int16
# saturates and misses the exact int32 total.
_K = 64


def _onednn_int8_exact() -> bool:
    try:
        w = torch.full((8, _K), 127, dtype=torch.int8)  # (out, K)
        packed = torch.ops.onednn.qlinear_prepack(w, [4, _K])
        x = torch.full((4, _K), 255, dtype=torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, packed, torch.ones(8), torch.zeros(8, dtype=torch.int64),
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return bool((y == 255 * 127 * _K).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@contextlib.contextmanager
def quantized_engine(name: str):
    """Pack with one quantized engine (a torch global) without changing it for anyone else."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def fbgemm_linear_prepack(wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """fbgemm's packed weight from int8 rows wq (out, K) with one fp32 scale per row, fp32 bias."""
    with warnings.catch_warnings():
        # torch marks its quantized tensor type deprecated; fbgemm's linear still takes only that
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(
            wq, scale.double(), torch.zeros(len(scale), dtype=torch.int64), 0
        )
        with quantized_engine("fbgemm"):
            return torch.ops.quantized.linear_prepack(q, bias)


def _fbgemm_int8_exact() -> bool:
    try:
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return False
        packed = fbgemm_linear_prepack(torch.full((8, _K), -127, dtype=torch.int8), torch.ones(8), None)
        # x = 127 is q = 127 at scale 1, zero point 0: the top of the 7-bit range
        x = torch.full((4, _K), 127.0)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1.0, 0, packed)
        return bool((y == -127 * 127 * _K).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_BF16_MISSING_CPU = "no native bf16 on this CPU (needs AVX512-BF16 or AMX; oneDNN refuses bf16 LSTMs here)"


def probe(device: torch.device | str = "cpu") -> Capabilities:
    """The precisions `device` ('cpu', 'cuda', 'cuda:1', ...) runs natively. Cached per device."""
    return _probe(str(torch.device(device)))


@functools.cache
def _probe(device: str) -> Capabilities:
    dev = torch.device(device)
    missing: dict[str, str] = {}
    if dev.type == "cuda":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not bf16:
            missing["bf16"] = f"no bf16 on this GPU ({_gpu_name(dev)})"
        missing["int8"] = "int8 sampling runs on CPU only"
        precs = ("fp32", "bf16") if bf16 else ("fp32",)
        return Capabilities(dev.type, precs, precs, (), missing)
    if dev.type != "cpu":
        missing["bf16"] = missing["int8"] = f"not supported on device type {dev.type!r}"
        return Capabilities(dev.type, ("fp32",), ("fp32",), (), missing)
    bf16 = _cpu_bf16_runs()
    if not bf16:
        missing["bf16"] = _BF16_MISSING_CPU
    kernels = tuple(
        name
        for name, exact in (("onednn-vnni", _onednn_int8_exact), ("fbgemm-avx2", _fbgemm_int8_exact))
        if exact()
    )
    if not kernels:
        missing["int8"] = "no exact int8 kernel on this CPU (needs AVX2 with fbgemm, or VNNI/AMX with oneDNN)"
    train = ("fp32", "bf16") if bf16 else ("fp32",)
    sample = (*train, "int8") if kernels else train
    return Capabilities("cpu", train, sample, kernels, missing)


def _gpu_name(dev: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(dev)
    except (AssertionError, RuntimeError):
        return "no CUDA device"


def resolve(precision: str, device: torch.device | str, stage: str) -> str:
    """'auto' -> the best native precision for `stage` ('train' or 'sample') on `device`; an
    explicit one is returned if it runs natively there, else PrecisionUnavailable in one line."""
    dev = torch.device(device)
    caps = probe(dev)
    if stage not in ("train", "sample"):
        raise ValueError(f"stage must be 'train' or 'sample', got {stage!r}")
    if precision == "auto":
        return caps.auto_train if stage == "train" else caps.auto_sample
    ok = caps.train if stage == "train" else caps.sample
    if precision in ok:
        return precision
    known = PRECISIONS if stage == "train" else SAMPLE_PRECISIONS
    if precision not in known:
        raise ValueError(f"precision must be one of {known}, got {precision!r}")
    why = caps.missing.get(precision, "not available")
    raise PrecisionUnavailable(
        f"precision {precision} cannot {stage} on {dev.type}: {why}; precisions that run here: "
        f"{', '.join(ok)} (or auto)"
    )


def report() -> dict[str, Any]:
    """What `charlm info` prints: the machine and the probe for the CPU (and a GPU if present)."""
    out = machine_info()
    out["capabilities"] = {"cpu": probe("cpu").to_dict()}
    if torch.cuda.is_available():
        out["capabilities"]["cuda"] = probe("cuda").to_dict()
    return out
