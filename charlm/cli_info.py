"""`charlm info`: what a bug report needs, from the machine to where the services are."""

from __future__ import annotations

import argparse
import os
from typing import Any

from charlm import __version__


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cmd_info(a: argparse.Namespace) -> dict:
    """What to paste into a bug report: the machine, the precisions it runs, the versions and
    where the store, MLflow and Ray are. Changes nothing (no folder is created)."""
    from charlm import capability

    info: dict[str, Any] = {"charlm": __version__, **capability.report()}
    info["versions"] = {
        d: _version(d) for d in ("torch", "ray", "prefect", "mlflow", "fsspec", "s3fs", "numpy")
    }
    try:
        from charlm import storage

        info["store"] = storage.store_root(a.store)
    except ModuleNotFoundError:  # the storage extra is not installed
        info["store"] = a.store or os.environ.get("CHARLM_STORE")
    try:
        from charlm.tracking import resolve_tracking_uri

        info["tracking_uri"] = resolve_tracking_uri(None, a.store, create=False)
    except ModuleNotFoundError:
        info["tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI")
    info["ray_address"] = os.environ.get("RAY_ADDRESS") or "local (started in-process)"
    if not a.json:
        _print_info(info)
    return info


def _print_info(info: dict[str, Any]) -> None:
    flags = ", ".join(info["cpu_flags"]) or "none of the tracked ones"
    lines = [
        f"charlm {info['charlm']}",
        f"cpu:          {info['cpu']} ({info['threads']} threads; flags: {flags})",
        f"cpu kernels:  ATen {info['aten_cpu_capability']}"
        + (f"; capped by {info['isa_caps']}" if info["isa_caps"] else ""),
    ]
    if info.get("gpu"):
        lines.append(f"gpu:          {info['gpu']} (CUDA {info['cuda']})")
    for dev, caps in info["capabilities"].items():
        lines.append(
            f"{dev + ':':<13} train {', '.join(caps['train'])} (auto {caps['auto']['train']}); "
            f"sample {', '.join(caps['sample'])} (auto {caps['auto']['sample']}"
            + (f", int8 kernel {caps['int8_kernel']}" if caps["int8_kernel"] else "")
            + ")"
        )
        for prec, why in caps["missing"].items():
            lines.append(f"{'':13} no {prec}: {why}")
    vers = ", ".join(f"{k} {v or 'not installed'}" for k, v in info["versions"].items())
    lines += [
        f"versions:     {vers}",
        f"store:        {info['store']}",
        f"tracking uri: {info['tracking_uri']}",
        f"ray address:  {info['ray_address']}",
    ]
    print("\n".join(lines))


def add_commands(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "info",
        help="this machine: CPU/GPU, the precisions it runs natively, versions, store, MLflow, Ray",
        description="Print what a bug report needs: the CPU (model, flags, caps), the precisions that "
        "train and sample natively here (found by running each once), the versions of torch, ray, "
        "prefect and mlflow, the store, the tracking URI and the Ray address.",
    )
    i.add_argument("--store", default=None, help="store root (default $CHARLM_STORE or ~/.charlm/store)")
    i.set_defaults(func=cmd_info)
