"""The simulated device refuses what CUDA refuses and allows what CUDA allows, so a device test that
passes on it means something."""
from __future__ import annotations

import pytest
import torch
from simulated_device import SIM, DeviceMismatch, Elsewhere, SimulatedDevice, off_device


def test_what_cuda_refuses_is_refused():
    with SimulatedDevice():
        x = torch.randn(3, 4).to(SIM)
        with pytest.raises(DeviceMismatch, match="CPU tensors of shape"):
            x + torch.ones(3, 4)
        with pytest.raises(DeviceMismatch, match="CPU tensors"):
            torch.cat([x, torch.ones(1, 4)])
        with pytest.raises(DeviceMismatch, match="CPU tensors"):
            x.index_select(0, torch.tensor([0]))  # unlike x[cpu_indices], index_select wants them on the device
        with pytest.raises(DeviceMismatch, match="Generator"):
            torch.randn(3, generator=torch.Generator(), device=SIM)
        with pytest.raises(DeviceMismatch, match="numpy"):
            x.numpy()
        with pytest.raises(DeviceMismatch, match="indexed with indices on the device"):
            torch.ones(4)[torch.tensor([1]).to(SIM)]


def test_what_cuda_allows_is_allowed_and_computes_on_the_data():
    with SimulatedDevice():
        x = torch.arange(12.0).reshape(3, 4).to(SIM)
        y = x * torch.tensor(2.0) + 1  # a 0-dim CPU tensor is a scalar
        assert isinstance(y, Elsewhere) and y.device == SIM
        assert y[torch.tensor([2])].cpu().tolist() == [[17.0, 19.0, 21.0, 23.0]]  # CPU indices index a device tensor
        assert torch.tensor([1.5, 2.5], device=SIM).cpu().tolist() == [1.5, 2.5]  # data made on the device
        assert torch.zeros(2, device=x.device).sum().item() == 0.0
        x.add_(1)
        assert isinstance(x, Elsewhere) and x.sum().item() == 78.0
        linear = torch.nn.Linear(4, 2).to(SIM)
        assert off_device(linear) == []
        linear.load_state_dict({"weight": torch.ones(2, 4), "bias": torch.zeros(2)})  # copies, as on CUDA
        assert linear(x).cpu()[0].tolist() == [10.0, 10.0]
        linear.cpu()
    assert off_device(linear) == ["weight", "bias"]
