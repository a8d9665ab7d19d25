"""Backends: what serves the ops, the pure-PyTorch fallback, and a stale build."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmlp

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


def _probe(prelude="", **env):
    code = PROBE.format(prelude=prelude)
    run_env = {k: v for k, v in os.environ.items() if k != "FASTMLP_DISABLE_EXTENSION"}
    run_env.update(PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]), **env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, cwd=PACKAGE_ROOT)
    return proc


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
