"""FP8 block quantization as DeepSeek ships it: e4m3 weights [out, in] and one scale per 128 x 128 block,
`weight_scale_inv` [ceil(out / 128), ceil(in / 128)] (DeepSeek's `fp8_gemm` reads scale[i // 128, k // 128], so
the last row and column blocks may be partial). Scales are fp32, or 1-byte e8m0 (a power of two) when the file
holds them so; both multiply the same way."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

E4M3_MAX = 448.0


def scale_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """fp32 weight[i, k] * scale[i // block[0], k // block[1]]."""
    rows, cols = weight.shape
    full = np.repeat(np.repeat(scale.astype(np.float32), block[0], axis=0), block[1], axis=1)[:rows, :cols]
    return weight.astype(np.float32) * full


def quantize(weight: np.ndarray, block: tuple[int, int] = (128, 128), pow2: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """e4m3 weight and fp32 block scales with amax / 448 per block (rounded up to a power of two when `pow2`, as
    `scale_fmt: ue8m0` checkpoints are): the inverse of `dequantize`, up to e4m3 rounding."""
    rows, cols = weight.shape
    grid = scale_grid(weight.shape, block)
    scale = np.empty(grid, np.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = weight[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            s = max(float(np.abs(tile).max()), 1e-12) / E4M3_MAX
            scale[i, j] = 2.0 ** math.ceil(math.log2(s)) if pow2 else s
    full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)[:rows, :cols]
    return (weight.astype(np.float32) / full).astype(ml_dtypes.float8_e4m3fn), scale
