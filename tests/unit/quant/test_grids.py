import math

import pytest

from lowbit_deploy.quant.grids import GridKind, IntegerGrid


@pytest.mark.parametrize("bits", range(1, 9))
def test_balanced_grid_is_symmetric_with_one_extra_level(bits):
    grid = IntegerGrid(GridKind.BALANCED, bits)
    assert grid.qmin == -grid.qmax
    assert grid.levels == 2**bits + 1
    assert grid.cost_bits == pytest.approx(math.log2(2**bits + 1))


@pytest.mark.parametrize("bits", range(1, 9))
def test_signed_grid_is_twos_complement(bits):
    grid = IntegerGrid(GridKind.SIGNED, bits)
    assert (grid.qmin, grid.qmax, grid.levels) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2**bits)


def test_paper_examples():
    assert [IntegerGrid(GridKind.BALANCED, 1).qmin, IntegerGrid(GridKind.BALANCED, 1).qmax] == [-1, 1]
    assert IntegerGrid(GridKind.BALANCED, 2).cost_bits == pytest.approx(2.32, abs=0.01)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="out of range"):
        IntegerGrid(GridKind.SIGNED, bits)
