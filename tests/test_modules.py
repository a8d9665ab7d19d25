"""Drop-in behaviour of the modules: initialisation, state_dict both ways, FusedMLP, convert()."""

import numpy as np
import pytest
import torch
from torch import nn

import fastmlp


@pytest.mark.parametrize("cls", [fastmlp.FusedLinearReLU, fastmlp.Linear])
def test_same_init_and_keys_as_nn_linear(cls):
    torch.manual_seed(0)
    ref = nn.Linear(30, 20)
    torch.manual_seed(0)
    ours = cls(30, 20)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert cls(3, 4, bias=False).bias is None
    assert cls(3, 4, dtype=torch.float64).weight.dtype == torch.float64


def test_state_dict_round_trip_both_ways():
    ref = nn.Linear(12, 7)
    ours = fastmlp.FusedLinearReLU(12, 7)
    ours.load_state_dict(ref.state_dict())
    back = nn.Linear(12, 7)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), torch.relu(back(x)))


def test_fused_mlp_structure_and_plain_twin():
    torch.manual_seed(0)
    mlp = fastmlp.FusedMLP([784, 128, 64, 10])
    assert [type(m) for m in mlp] == [fastmlp.FusedLinearReLU, fastmlp.FusedLinearReLU, fastmlp.Linear]
    plain = mlp.to_torch()
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert plain.state_dict().keys() == mlp.state_dict().keys()
    x = torch.randn(9, 784)
    torch.testing.assert_close(mlp(x), plain(x))
    again = fastmlp.FusedMLP.from_torch(plain)
    torch.testing.assert_close(again(x), plain(x))
    fresh = fastmlp.plain_mlp([784, 128, 64, 10])
    fresh.load_state_dict(mlp.state_dict())  # checkpoints load into the plain model
    torch.testing.assert_close(fresh(x), mlp(x))


@pytest.mark.parametrize("sizes", [[], [5], [4, 0, 3], [3, -1]])
def test_fused_mlp_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes"):
        fastmlp.FusedMLP(sizes)


@pytest.mark.parametrize("sizes", [[7, 2.5, 4], [7, True, 4], [7, "3", 4]])
def test_fused_mlp_takes_integer_sizes_only(sizes):
    with pytest.raises(TypeError, match="sizes must be integers"):
        fastmlp.FusedMLP(sizes)
    assert fastmlp.FusedMLP([7, torch.tensor(3), np.int64(4)]).sizes == (7, 3, 4)


@pytest.mark.parametrize("fn", [fastmlp.linear_relu, fastmlp.linear])
def test_functional_bias_must_be_a_tensor(fn):
    for x in (torch.randn(2, 3), torch.randn(2, 2, 3)):
        with pytest.raises(TypeError, match="bias must be a tensor or None"):
            fn(x, torch.randn(4, 3), [1.0, 2.0, 3.0, 4.0])


def test_convert_replaces_linear_relu_pairs_at_any_depth():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Sequential(nn.Linear(12, 12), nn.ReLU(inplace=True), nn.Linear(12, 8)),  # nested
        nn.Tanh(),
        nn.Linear(8, 8),  # not followed by ReLU: untouched
        nn.Sigmoid(),
        nn.ReLU(),  # ReLU not after a Linear: untouched
    )
    x = torch.randn(6, 4, 4)
    want = model(x)
    converted = fastmlp.convert(model)
    assert type(converted[1]) is fastmlp.FusedLinearReLU and type(converted[2]) is nn.Identity
    assert type(converted[3][0]) is fastmlp.FusedLinearReLU and type(converted[3][1]) is nn.Identity
    assert type(converted[3][2]) is nn.Linear and type(converted[5]) is nn.Linear
    assert type(converted[7]) is nn.ReLU
    assert converted.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(converted(x), want)
    assert type(model[1]) is nn.Linear, "convert() must not modify its argument unless inplace=True"
    # inplace keeps the very same Parameter objects, so an existing optimizer keeps working
    weight = model[1].weight
    assert fastmlp.convert(model, inplace=True) is model and model[1].weight is weight


def test_training_trajectory_matches_plain_pytorch():
    torch.manual_seed(0)
    fused = fastmlp.FusedMLP([20, 16, 3])
    plain = fused.to_torch()
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    trajectories = []
    for model in (fused, plain):
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        losses = []
        for _ in range(40):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trajectories.append(losses)
    assert trajectories[0][-1] < 0.7 * trajectories[0][0]
    torch.testing.assert_close(torch.tensor(trajectories[0]), torch.tensor(trajectories[1]), rtol=1e-4, atol=1e-5)
