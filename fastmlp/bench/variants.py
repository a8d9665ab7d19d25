"""A benchmarked variant: how to build it, and whether it is fastmlp's own (then it gets a ratio
against every baseline) or a baseline (eager PyTorch, torch.compile)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Variant:
    build: Callable  # layers: build(in_features, out_features) -> module; training: build(sizes, state) -> Stepper
    ours: bool  # fastmlp's own (True) or a PyTorch baseline (False)
    about: str = ""


def error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first[:300]


def configure_dynamo():
    with contextlib.suppress(Exception):
        import torch._dynamo

        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        # Hitting the limit must fail loudly (reported n/a), never silently run eager code.
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True
    # Inductor's import logs a warning about CUDA on CPU-only machines: noise in a benchmark table.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def reset_dynamo():
    with contextlib.suppress(Exception):
        import torch._dynamo

        torch._dynamo.reset()


def compile_fn(fn):
    """torch.compile in the default mode with static shapes (one graph per shape)."""
    configure_dynamo()
    return torch.compile(fn, dynamic=False)
