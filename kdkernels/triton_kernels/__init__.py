"""@triton.jit kernels of the Triton backend, one module per row-op stage.

common.py    loading, softcap, rounding, and the layout columns and flag values (layouts.py)
row_math.py  the divergences' element math (mix terms, gradient G) and their DIV codes
             (divergences.TABLE): the one Triton file a new divergence touches
stats.py   online (max, sum, weighted sum) partials per (row block, vocab split) + merge
mix.py     the two plain sums of the mix divergences per (row block, vocab split)
grad.py    dL/dz of the student, written over a [BLOCK_R, BLOCK_V] tile

Every kernel works on [BLOCK_R, BLOCK_V] tiles: one row per program with long blocks for
large vocabularies on a GPU, many rows per program for small ones (and under the CPU
interpreter, where each program instance costs milliseconds of Python).
"""
