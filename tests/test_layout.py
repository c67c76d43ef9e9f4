"""onnxqf.maths.layout: the tiled transpose equals numpy's, on every edge case of its tiles."""

import numpy as np
import pytest

from onnxqf.maths.layout import transpose_copy


@pytest.mark.parametrize("shape", [(1, 1), (1, 5000), (5000, 1), (130, 1025), (256, 2048), (300, 77), (0, 7)])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.float16, np.float64])
def test_equals_numpy_transpose(shape, dtype):
    a = (np.random.default_rng(sum(shape)).standard_normal(shape) * 50).astype(dtype)
    got = transpose_copy(a)
    assert got.flags["C_CONTIGUOUS"] and got.dtype == a.dtype
    np.testing.assert_array_equal(got, a.T)


def test_small_tiles_and_views():
    a = np.arange(7 * 11, dtype=np.int32).reshape(7, 11)[1:, 2:]  # a non-contiguous view
    np.testing.assert_array_equal(transpose_copy(a, rows=2, cols=3), a.T)
    np.testing.assert_array_equal(transpose_copy(a.T, rows=4, cols=1), a)


def test_refuses_other_ranks_and_empty_tiles():
    with pytest.raises(ValueError, match="2-D"):
        transpose_copy(np.zeros(3))
    with pytest.raises(ValueError, match="tiles"):
        transpose_copy(np.zeros((2, 2)), rows=0)
