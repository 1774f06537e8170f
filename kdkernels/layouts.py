"""Named column layouts of the row-op contract: one definition each, mirrored into C++ and
Triton.

``csrc/row_math.h`` spells each layout as an enum (``enum Stat : int { kStatMA = 0, ... }``,
last entry the count); ``tests/test_layouts.py`` parses the header and checks it against
these tables. The Triton kernels take their column indices from here at import
(``triton_kernels/common.py``, ``row_math.py``), so they cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Columns:
    """An ordered set of named columns: ``STATS.m_a`` is the index of column ``m_a``."""

    name: str  # the C++ enum and its prefix: enum Stat { kStatMA = 0, ..., kStats }
    names: tuple[str, ...]

    def __getattr__(self, key: str) -> int:
        try:
            return self.names.index(key)
        except ValueError:
            raise AttributeError(f"layout {self.name} has no column {key!r}") from None

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)


# Per-row partial statistics of the stats pass (row_stats.py says how they merge):
# a = z / T (student), b = t / T (teacher), z the untempered student.
STATS = Columns("Stat", (
    "m_a",      # max of a
    "s_a",      # sum exp(a - m_a)
    "w_a",      # sum exp(a - m_a) * (a - b)   (divergences with stats_weight "student")
    "m_b",      # max of b
    "s_b",      # sum exp(b - m_b)
    "w_b",      # sum exp(b - m_b) * (b - a)   (divergences with stats_weight "teacher")
    "m_z",      # max of z                      (hard-label CE at T != 1, else = m_a)
    "s_z",      # sum exp(z - m_z)              (hard-label CE at T != 1, else = s_a)
    "z_label",  # z at the row's label if it is in this block, else 0 (a plain sum)
    "e_a",      # sum exp(a - m_a) * (a - m_a): the student entropy is log s_a - e_a / s_a
))

# The two plain sums of the mix pass (merged by addition); divergences.py names them.
MIX = Columns("MixSum", ("c0", "c1"))

# Full-row log-normalisers, split as lse = m + log_s, for the mix pass.
NORMS = Columns("NormCol", ("m_a", "log_s_a", "m_b", "log_s_b"))

# Per-row coefficients of the gradient pass: the split log-normalisers of a, b and z, the
# divergence's row scalar ``aux``, d(loss)/d(divergence) / T and d(loss)/d(CE).
COEF = Columns("Coef", ("m_a", "log_s_a", "m_b", "log_s_b", "m_z", "log_s_z", "aux", "kd",
                        "ce"))

# Row constants of one loss call (RowSpec.consts), the same for every row and every backend:
#   inv_t         1 / temperature
#   tempered      1.0 if T != 1 (decided once, in RowSpec), else 0.0
#   cap_s, cap_t  student / teacher softcap, 0 for none
#   w_q           weight of q in the divergence's mixture (divergences.py)
#   log_w_q       log(w_q), 0 when w_q == 0
#   log_w_p       log(1 - w_q), 0 when w_q == 1
#   k_div         the constant factor of the divergence's gradient G (backends/base.py)
#   mix_kind      MIX_KINDS index: which terms the mixture has (exact at weights 0 and 1)
#   stats_weight  STATS_WEIGHTS index: which weighted sum the stats pass keeps
#   scale_s       student logit scale: z = softcap(scale_s * raw) (1 for none)
#   scale_t       teacher logit scale, the same before the teacher's softcap
#   want_entropy  1.0: the stats passes sum e_a (STATS, SSTATS); 0.0: they skip that work
#                 (return_components=False never reports the entropy) and leave e_a at 0
CONSTS = Columns("Const", ("inv_t", "tempered", "cap_s", "cap_t", "w_q", "log_w_q", "log_w_p",
                           "k_div", "mix_kind", "stats_weight", "scale_s", "scale_t",
                           "want_entropy"))

# Student-only row ops of the sparse (top-k) teacher losses: partial stats over the columns
# whose raw logit is not -inf (the driver masks the teacher's ids), merged like STATS.
SSTATS = Columns("SStat", ("m_a", "s_a", "m_z", "s_z", "e_a"))
# Their gradient coefficients: the a-normaliser carries log|row coefficient| (see
# backends/base.py), kd and ce the signs and weights.
SCOEF = Columns("SCoef", ("m_a", "log_s_a", "m_z", "log_s_z", "kd", "ce"))

MIX_KINDS = Columns("MixKind", ("both", "only_q", "only_p"))
STATS_WEIGHTS = Columns("Weight", ("none", "student", "teacher"))

# Every layout the C++ header mirrors, by its enum name.
MIRRORED = (STATS, MIX, NORMS, COEF, CONSTS, MIX_KINDS, STATS_WEIGHTS, SSTATS, SCOEF)
