"""Benchmarks: fastmlp against eager PyTorch and torch.compile, checked, then measured fairly.

    fastmlp bench                      # quick subset, prints the tables (python -m benchmarks does the same)
    fastmlp bench --full --json out.json
    fastmlp bench --compare old.json --fail-on-regression
    fastmlp bench --list               # case ids, for --cases
    fastmlp bench --show out.json      # the tables of a saved run

The same code serves `pytest benchmarks/`. The modules, in the order a run uses them:

    cases     what is benchmarked: layer shapes, models, datasets, case ids and selection
    variants  a variant (how to build it; fastmlp's own or a baseline)
    layers    layer cases: FusedLinearReLU vs nn.Linear + nn.ReLU, forward / backward / both, in float32
              and under torch.autocast(bfloat16)
    inference infer cases: a whole MLP's forward under inference_mode, FusedMLP vs the plain model
    training  step and epoch cases (step variants on random data) and trainer cases (`fastmlp train`'s
              Trainer, fused vs --backend torch; with --precision bf16 also vs torch under autocast)
    verify    the checks every variant passes before it is timed (a variant that fails is reported
              FAILED with what differed, gets no ratio, and the run exits 1)
    timing    per-iteration samplers, interleaved rounds, statistics
    machine   CPU model and flags, other load, peak GEMM speed
    runner    builds, checks and times a case into its result record
    report    tables and notes; compare: regressions against an earlier run; cli: `fastmlp bench`

How things are measured: every variant of a case runs in this process on the same inputs with its own
copy of the same initial weights; variants are interleaved round by round and each figure is a median
of per-iteration times; warm-up (including torch.compile's compilation) comes first; GFLOP/s count
2*M*K*N per GEMM actually run (forward 1, backward 2: dX and dW). Layer "bwd" times only the backward,
each iteration's forward run untimed before it. torch.compile uses the default mode with static shapes.
Targets are not part of this package: they live in BENCHMARKS.md.
"""

from .cases import (BASELINES, BATCH, BF16_LAYER_SHAPES, DATASETS, GEMMS_PER_PASS, LAYER_SHAPES, MODELS, PASSES,
                    QUICK_CASES, SGD, all_case_ids, layer_id, select_cases)
from .cli import SCHEMA, main, settings_record, show, write_json
from .compare import compare
from .inference import INFER_VARIANTS, InferenceCase
from .layers import BF16_LAYER_VARIANTS, LAYER_VARIANTS, Bf16LayerCase, LayerCase
from .machine import LoadMonitor, cpu_model, machine_info, measure_peak, other_cpu_load
from .report import format_machine, format_notes, format_tables, is_ours, wrong_variants
from .runner import Runner, Settings, measure
from .timing import TIMERS, calibrate, interleave, summarize
from .training import (STEP_VARIANTS, TRAINER_VARIANTS, EpochPlan, Stepper, TrainCase, TrainerCase, eager_step, register_step_variant,
                       training_data)
from .variants import Variant, error_text
from .verify import check_epoch, check_layer, check_output, check_training

__all__ = [
    "BASELINES", "BATCH", "BF16_LAYER_SHAPES", "BF16_LAYER_VARIANTS", "Bf16LayerCase", "DATASETS", "EpochPlan", "GEMMS_PER_PASS", "INFER_VARIANTS", "InferenceCase",
    "LAYER_SHAPES", "LAYER_VARIANTS", "LayerCase", "LoadMonitor", "MODELS", "PASSES", "QUICK_CASES", "Runner",
    "SCHEMA", "SGD", "STEP_VARIANTS", "Settings", "Stepper", "TIMERS", "TRAINER_VARIANTS", "TrainCase",
    "TrainerCase", "Variant", "all_case_ids", "calibrate", "check_epoch", "check_layer", "check_output",
    "check_training", "compare", "cpu_model", "eager_step", "error_text", "format_machine", "format_notes",
    "format_tables", "interleave", "is_ours", "layer_id", "machine_info", "main", "measure", "measure_peak",
    "other_cpu_load", "register_step_variant", "select_cases", "settings_record", "show", "summarize",
    "training_data", "write_json", "wrong_variants",
]
