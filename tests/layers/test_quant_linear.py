"""The quantized matmul (kernels/quant_matmul.c) on random blocks of every supported format.

Every build (this CPU's, the AVX2 one, the plain-C fallback) must equal the one-element-at-a-time
reference bit for bit — they accumulate in the same order by construction — at every row count,
including row counts that are not a multiple of the 8-row interleave, and be close to the fp32
matmul of the dequantized weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
import gguf.quants

from ponder.layers import quant_linear
from ponder.layers.quant_linear import QuantEmbedding, QuantLinear, QuantMatrix
from ponder.model import repack

pytestmark = pytest.mark.skipif(not quant_linear.available(), reason="needs a C compiler")

FORMATS = list(repack.FORMATS)
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 64]
_SCALE_FIELDS = {QT.Q6_K: (208,), QT.Q4_1: (0, 2), QT.Q5_1: (0, 2), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2)}


def random_blocks(qtype: QT, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the GGUF layout of `qtype` with sane fp16 scales: [n, row bytes]."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for off in _SCALE_FIELDS.get(qtype, (0,)):
        scales = rng.uniform(-0.05, 0.05, size=raw.shape[:2]).astype(np.float16)
        raw[..., off:off + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(n, -1)


def matrix(qtype: QT, n: int, k: int, seed: int = 0) -> tuple[QuantMatrix, torch.Tensor]:
    """A packed matrix and its exact float32 values."""
    fmt = repack.FORMATS[qtype]
    parts = repack.split(random_blocks(qtype, n, k, seed), qtype, n, k)
    packed = torch.from_numpy(repack.pack(parts, fmt))
    return QuantMatrix(fmt.id, n, k, packed), torch.from_numpy(repack.dequantize_parts(parts, fmt))


def builds() -> list[tuple[str, object, int]]:
    """(name, library, expected path) for each build this machine can run: native, then every
    narrower instruction set down to plain C."""
    native = quant_linear.library()
    out = [("native", native, native.qmm_isa())]
    if native.qmm_isa() == 3:
        out.append(("vnni256", quant_linear.library(("-mno-avx512bw",)), 2))
    if native.qmm_isa() >= 2:
        out.append(("avx2", quant_linear.library(("-mno-avx512f", "-mno-avxvnni")), 1))
    out.append(("plain-c", quant_linear.library(("-mno-avx2",)), 0))
    return out


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_split_is_lossless(qtype):
    n, k = 11, 512
    raw = random_blocks(qtype, n, k)
    parts = repack.split(raw, qtype, n, k)
    expected = gguf.quants.dequantize(raw, qtype).reshape(n, k)
    assert np.array_equal(repack.dequantize_parts(parts, repack.FORMATS[qtype]), expected)
    assert repack.pack(parts, repack.FORMATS[qtype]).size == quant_linear.library().qmm_group_bytes(
        repack.FORMATS[qtype].id, k) * 2


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_every_build_equals_reference(qtype):
    n, k = 37, 512    # 37 rows: four full groups of 8 (two pairs) and a partial one
    mat, w = matrix(qtype, n, k)
    lin = QuantLinear([mat], torch.randn(n))
    reference = quant_linear.library().qlinear_ref
    torch.manual_seed(0)
    for name, lib, path in builds():
        assert lib.qmm_isa() == path
        for m in ROWS:
            x = torch.randn(m, k) * 3
            want = lin.run(x, reference)
            got = lin.run(x, lib.qlinear)
            assert torch.equal(got, want), f"{name} build, M={m}: max diff {(got - want).abs().max()}"
            dense = x @ w.t() + lin.bias
            assert (got - want).abs().max() <= 1e-6 * want.abs().max()
            nmse = ((got - dense) ** 2).mean() / (dense ** 2).mean()
            assert nmse <= 5e-4, f"M={m}: NMSE {nmse:.2e} against the dequantized fp32 matmul"


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_0, QT.Q8_0], ids=lambda q: q.name)
def test_row_result_is_independent_of_batch(qtype):
    mat, _ = matrix(qtype, 24, 256)
    lin = QuantLinear([mat])
    x = torch.randn(64, 256)
    batch = lin(x)
    for i in (0, 5, 63):
        assert torch.equal(lin(x[i:i + 1])[0], batch[i])
        assert torch.equal(lin(x[i:i + 7])[0], batch[i])


def test_mixed_format_segments_write_their_own_columns():
    k = 256
    parts = [matrix(QT.Q5_0, 16, k, 1), matrix(QT.Q8_0, 8, k, 2), matrix(QT.Q6_K, 13, k, 3)]
    dense = torch.randn(5, k)
    fused = QuantLinear([m for m, _ in parts] + [QuantMatrix(None, 5, k, dense)], torch.randn(42))
    x = torch.randn(3, k)
    y = fused(x)
    col = 0
    for m, _ in parts:
        alone = QuantLinear([m], fused.bias[col:col + m.n])(x)
        assert torch.equal(y[:, col:col + m.n], alone)
        col += m.n
    assert torch.allclose(y[:, col:], x @ dense.t() + fused.bias[col:], atol=1e-5)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_embedding_rows_are_the_dequantized_rows(qtype):
    mat, w = matrix(qtype, 19, 256)
    ids = torch.tensor([0, 7, 8, 18, 7])
    assert torch.equal(QuantEmbedding(mat)(ids), w[ids])
    with pytest.raises(IndexError):
        QuantEmbedding(mat)(torch.tensor([19]))


def test_unsupported_width_is_a_clear_error():
    mat, _ = matrix(QT.Q4_K, 8, 256)
    bad = QuantMatrix(mat.format, 8, 288, mat.data)   # K-quants need K to be a multiple of 256
    with pytest.raises(ValueError, match="K=288"):
        QuantLinear([bad])(torch.randn(1, 288))
