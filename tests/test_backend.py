"""Backends: what serves the ops, the pure-PyTorch fallback, and a stale build."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmlp
from _helpers import COMPILED_CPU_ISAS

# The probes must import the same fastmlp as this process (installed, editable or in-place build).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastmlp.__file__)))

# Trains a few steps of the MNIST MLP and prints outputs and gradients as JSON.
PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    {prelude}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastmlp
        import fastmlp.functional
    import torch
    torch.manual_seed(0)
    model = fastmlp.FusedMLP([784, 128, 64, 10])
    x = torch.randn(64, 784)
    y = torch.randint(0, 10, (64,))
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    print(json.dumps({{
        "backend": fastmlp.backend(),
        "warnings": [str(w.message) for w in caught if "fastmlp" in str(w.message)],
        "out": out.tolist(),
        "grads": [p.grad.tolist() for p in model.parameters()],
    }}))
    """
)


def _python(code, **env):
    """Runs `code` in a fresh interpreter importing this fastmlp, with `env` added to the environment
    (FASTMLP_DISABLE_EXTENSION, FASTMLP_CPU_ISA and FASTMLP_CPU_KBLOCK only as given there)."""
    unset = ("FASTMLP_DISABLE_EXTENSION", "FASTMLP_CPU_ISA", "FASTMLP_CPU_KBLOCK")
    run_env = {k: v for k, v in os.environ.items() if k not in unset}
    run_env.update(PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, cwd=PACKAGE_ROOT)


def _probe(prelude="", **env):
    return _python(PROBE.format(prelude=prelude), **env)


def _result(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_backend_reports_what_serves():
    info = fastmlp.backend_info()
    assert fastmlp.backend("cpu") in ("compiled", "fallback")
    assert fastmlp.backend("cuda") in ("compiled", "fallback")
    assert info["cpu"] == fastmlp.backend("cpu")
    with pytest.raises(ValueError):
        fastmlp.backend("mps")


def test_extension_is_built():
    """CI builds the extension: the fallback must not silently take over."""
    if os.environ.get("FASTMLP_DISABLE_EXTENSION") == "1":
        pytest.skip("extension disabled on purpose")
    assert fastmlp.backend("cpu") == "compiled", fastmlp.backend_info()


def test_fallback_gives_the_same_results():
    compiled = _result(_probe())
    if compiled["backend"] != "compiled":
        pytest.skip("no compiled extension to compare with")
    fallback = _result(_probe(FASTMLP_DISABLE_EXTENSION="1"))
    assert fallback["backend"] == "fallback"
    assert fallback["warnings"] == []  # disabled on purpose: no warning
    torch.testing.assert_close(torch.tensor(fallback["out"]), torch.tensor(compiled["out"]), rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(fallback["grads"], compiled["grads"]):
        torch.testing.assert_close(torch.tensor(g1), torch.tensor(g2), rtol=1e-5, atol=1e-6)


def test_unloadable_extension_warns_once_and_falls_back():
    # sys.modules[name] = None makes that import fail, as a missing or broken .so would.
    proc = _probe(prelude="sys.modules['fastmlp._C'] = None")
    res = _result(proc)
    assert res["backend"] == "fallback"
    assert len(res["warnings"]) == 1 and "pure-PyTorch fallback" in res["warnings"][0]


def test_extension_built_for_another_torch_says_rebuild():
    prelude = "import types; sys.modules['fastmlp._build_meta'] = types.SimpleNamespace(TORCH_VERSION='1.0.0')"
    proc = _probe(prelude=prelude)
    assert proc.returncode != 0
    assert "built against torch 1.0.0" in proc.stderr and "Rebuild" in proc.stderr


def _isa_case():
    """A layer's inputs whose float32 output differs between the generic and the SIMD kernels."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 300, generator=gen), torch.randn(24, 300, generator=gen), torch.randn(24, generator=gen)


ISA_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import fastmlp
    from test_backend import _isa_case
    print(json.dumps({{"info": fastmlp.backend_info(), "out": fastmlp.linear(*_isa_case()).tolist()}}))
    """
)


def test_compiled_cpu_isas_are_all_listed():
    """Every kernel family this CPU runs is one that _helpers.cpu_isas() parametrizes the tests over."""
    info = fastmlp.backend_info()
    if not info["extension"]:
        pytest.skip("no compiled extension")
    assert set(info["supported_cpu_isas"]) <= set(COMPILED_CPU_ISAS), info
    assert info["cpu_isa"] == info["supported_cpu_isas"][0]  # the best one by default


@pytest.mark.parametrize("value", ["avx2", "generic", "sse9"])
def test_cpu_isa_environment_variable(value):
    """FASTMLP_CPU_ISA set before import picks the CPU kernels, as set_cpu_isa would; a value that is no
    kernel family this CPU runs warns and is ignored (the best one serves, as without it)."""
    info = fastmlp.backend_info()
    if not info["extension"]:
        pytest.skip("no compiled extension")
    if value in COMPILED_CPU_ISAS and value not in info["supported_cpu_isas"]:
        pytest.skip(f"CPU lacks {value}")
    proc = _python(ISA_PROBE.format(tests=os.path.dirname(os.path.abspath(__file__))), FASTMLP_CPU_ISA=value)
    got = _result(proc)
    expected = value if value in COMPILED_CPU_ISAS else info["supported_cpu_isas"][0]
    assert got["info"]["cpu_isa"] == expected
    assert (f"FASTMLP_CPU_ISA={value} is not a CPU kernel family" in proc.stderr) == (value != expected)
    fastmlp.set_cpu_isa(expected)
    try:
        want = fastmlp.linear(*_isa_case())
    finally:
        fastmlp.set_cpu_isa("auto")
    assert torch.equal(torch.tensor(got["out"], dtype=want.dtype), want), "not the kernels set_cpu_isa selects"


@pytest.mark.parametrize("value", ["64", "100", "x"])
def test_k_block_environment_variable(value):
    """FASTMLP_CPU_KBLOCK set before import sets the K block of the CPU GEMMs, as _C.set_cpu_k_block
    would; a value that is no multiple of 16 from 16 to 1024 warns and the CPU's own block serves."""
    info = fastmlp.backend_info()
    if not info["extension"]:
        pytest.skip("no compiled extension")
    proc = _python(ISA_PROBE.format(tests=os.path.dirname(os.path.abspath(__file__))), FASTMLP_CPU_KBLOCK=value)
    got = _result(proc)
    valid = value == "64"
    assert got["info"]["cpu_k_block"] == (64 if valid else info["cpu_k_block"])
    assert (f"FASTMLP_CPU_KBLOCK={value} is not a multiple of 16" in proc.stderr) == (not valid)
    assert torch.equal(torch.tensor(got["out"]), fastmlp.linear(*_isa_case())), "the block changed a result"


def test_python_schemas_equal_the_compiled_ones():
    """fastmlp/_ops.py's SCHEMAS (the fallback's definitions) must say what csrc/ops.cpp says."""
    from fastmlp import _ops
    if _ops._C is None:
        pytest.skip("no compiled extension: the Python schemas are the only ones")
    for name, schema in _ops.SCHEMAS.items():
        compiled = getattr(torch.ops.fastmlp, name).default._schema
        assert str(compiled) == str(torch._C.parse_schema("fastmlp::" + schema)), name
