"""Factories for tests of bad models (imported by qfx through `model.factory`)."""
import torch


class _Overflowing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.fc1(x) * 1e38 * 1e38)  # inf reaches fc2's input


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # Python control flow on a tensor's value: torch.export cannot capture it
            return y * 2
        return y


def overflowing():
    torch.manual_seed(0)
    return _Overflowing(), (torch.randn(2, 16),)


def data_dependent():
    torch.manual_seed(0)
    return _DataDependent(), (torch.randn(2, 16),)


class _MatmulOnly(torch.nn.Module):
    """Multiplies by a parameter with torch.matmul: no nn.Linear for qfx to quantize."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        return torch.matmul(x, self.w)


def matmul_only():
    torch.manual_seed(0)
    return _MatmulOnly(), (torch.randn(2, 16),)
