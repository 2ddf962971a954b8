"""A slow, obvious bilinear resize for the position-embedding tests: one loop per output cell."""

import numpy as np


def bilinear_by_hand(grid, positions):
    """[n, n, D] -> [m, m, D] float64: output cell (i, j) is the weighted mean of the 4 old
    cells around the point (positions[i], positions[j]) (old cell units, within [0, n-1])."""
    n = grid.shape[0]
    out = np.zeros((len(positions), len(positions), grid.shape[-1]))
    for i, y in enumerate(positions):
        for j, x in enumerate(positions):
            y0, x0 = min(int(np.floor(y)), n - 1), min(int(np.floor(x)), n - 1)
            y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = (
                (1 - dy) * (1 - dx) * grid[y0, x0]
                + (1 - dy) * dx * grid[y0, x1]
                + dy * (1 - dx) * grid[y1, x0]
                + dy * dx * grid[y1, x1]
            )
    return out
