"""The streaming safetensors writer gives files the safetensors library reads back exactly."""
import hashlib

import torch
from safetensors import safe_open

from qfx.lowering.safetensors_writer import write_safetensors


def test_round_trip_every_dtype_and_shape(tmp_path):
    tensors = {
        "a.weight": torch.randn(3, 5),
        "b.codes": torch.randint(-128, 127, (4, 7), dtype=torch.int8),
        "c.fp8": torch.randn(2, 3).to(torch.float8_e4m3fn),
        "d.scale": torch.tensor(0.25),
        "e.packed": torch.randint(-2**31, 2**31 - 1, (6, 1), dtype=torch.int32),
        "f.half": torch.randn(3).to(torch.bfloat16),
        "g.empty": torch.zeros(0, 4),
        "h.view": torch.randn(4, 6).t(),  # non-contiguous
    }
    path = tmp_path / "m.safetensors"
    digest = write_safetensors(path, tensors, {"format": "pt"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            back = f.get_tensor(name)
            assert back.dtype == t.dtype and back.shape == t.shape
            assert torch.equal(back.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0  # data starts 8-byte aligned


def test_tensors_larger_than_one_write_are_split_without_loss(tmp_path, monkeypatch):
    import qfx.lowering.safetensors_writer as writer

    monkeypatch.setattr(writer, "CHUNK_BYTES", 12)  # pieces that cut through elements
    tensors = {"big": torch.randn(7, 5), "codes": torch.randint(-128, 127, (37,), dtype=torch.int8)}
    path = tmp_path / "m.safetensors"
    digest = write_safetensors(path, tensors)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), "pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
