"""ponder.model.dequant against gguf's numpy reference dequantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from ponder.model.dequant import SUPPORTED_TYPES, dequantize

# Byte offsets of the fp16 scale/min fields inside one block. Random bytes there
# would decode to NaN/inf, which makes elementwise comparison meaningless.
FP16_FIELDS: dict[QT, tuple[int, ...]] = {
    QT.Q8_0: (0,),
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


def random_blocks(qtype: QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid quantized data, shaped like GGUFReader's (rows, row_bytes)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scale = rng.standard_normal(n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, -1)


def random_floats(qtype: QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    if qtype == QT.F32:
        return x
    if qtype == QT.F16:
        return x.astype(np.float16)
    # BF16 as GGUFReader exposes it: raw bytes (truncating is a valid bf16 value).
    return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def test_supported_types_are_covered() -> None:
    assert SUPPORTED_TYPES == set(FP16_FIELDS) | set(FLOAT_TYPES)


@pytest.mark.parametrize("qtype", list(FP16_FIELDS), ids=lambda t: t.name)
def test_quantized_matches_reference(qtype: QT) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rows, cols = 16, 4 * block_size
    raw = random_blocks(qtype, rows, cols)
    expected = torch.from_numpy(gguf_quants.dequantize(raw, qtype))
    assert expected.shape == (rows, cols)

    got = dequantize(raw, qtype, (rows, cols))
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)

    # Flat bytes decode the same as GGUFReader's 2-D view.
    torch.testing.assert_close(dequantize(raw.reshape(-1), qtype, (rows, cols)), got, rtol=0, atol=0)

    # Other dtypes are the fp32 result cast once (no extra rounding steps).
    for dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(dequantize(raw, qtype, (rows, cols), dtype), expected.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_matches_reference(qtype: QT) -> None:
    raw = random_floats(qtype, 8, 64)
    expected = torch.from_numpy(np.ascontiguousarray(gguf_quants.dequantize(raw, qtype)))
    expected = expected.reshape(8, 64)

    got = dequantize(raw, qtype, (8, 64))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if qtype == QT.BF16:
        # Reader may also hand BF16 out as uint16.
        torch.testing.assert_close(dequantize(raw.view(np.uint16), qtype, (8, 64)), expected, rtol=0, atol=0)
    torch.testing.assert_close(dequantize(raw, qtype, (8, 64), torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0], ids=lambda t: t.name)
def test_result_does_not_alias_readonly_input(qtype: QT) -> None:
    raw = random_floats(qtype, 4, 32) if qtype == QT.F32 else random_blocks(qtype, 4, 32)
    raw.setflags(write=False)  # like GGUFReader's memmap
    before = raw.copy()
    out = dequantize(raw, qtype, (4, 32))
    out.add_(1.0)
    np.testing.assert_array_equal(raw, before)


def test_shape_handling() -> None:
    # Rows > 1, a 3-D shape, and chunk boundaries that do not align with rows.
    qtype = QT.Q4_K
    rows, cols = 37, 512
    raw = random_blocks(qtype, rows, cols, seed=1)
    expected = torch.from_numpy(gguf_quants.dequantize(raw, qtype))

    got = dequantize(raw, qtype, (rows, cols))
    assert got.shape == (rows, cols)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # Row r of the result comes from row r of the bytes.
    torch.testing.assert_close(got[5], dequantize(raw[5], qtype, (cols,)), rtol=0, atol=0)

    got3 = dequantize(raw, qtype, (1, rows, cols))
    assert got3.shape == (1, rows, cols) and got3.is_contiguous()
    torch.testing.assert_close(got3[0], got, rtol=0, atol=0)


def test_multi_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import ponder.model.dequant as dq

    monkeypatch.setattr(dq, "_CHUNK_ELEMS", 1000)  # forces many ragged chunks
    for qtype in (QT.Q8_0, QT.Q6_K):
        raw = random_blocks(qtype, 12, 512, seed=2)
        expected = torch.from_numpy(gguf_quants.dequantize(raw, qtype))
        for dtype in (torch.float32, torch.bfloat16):
            got = dequantize(raw, qtype, (12, 512), dtype)
            torch.testing.assert_close(got, expected.to(dtype), rtol=1e-6, atol=0)


def test_unsupported_type_raises() -> None:
    raw = np.zeros(GGML_QUANT_SIZES[QT.Q2_K][1], dtype=np.uint8)
    with pytest.raises(NotImplementedError, match="Q2_K"):
        dequantize(raw, QT.Q2_K, (256,))


def test_size_mismatch_raises() -> None:
    raw = random_blocks(QT.Q8_0, 2, 64)
    with pytest.raises(ValueError):
        dequantize(raw, QT.Q8_0, (3, 64))
    with pytest.raises(ValueError):
        dequantize(raw, QT.Q8_0, (4, 16))  # last dim not a multiple of 32
