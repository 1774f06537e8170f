"""The C++ mirror of the Python tables: every layout of kdkernels.layouts.MIRRORED and the
divergence table are spelled as enums in csrc/row_math.h, and has_mix_terms lists exactly
the divergences that need the mix pass. Parsing the header keeps the two from drifting
without building anything."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from kdkernels import layouts
from kdkernels.divergences import TABLE

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "row_math.h"
# Words of a divergence name written in capitals in its C++ entry (forward_kl -> kForwardKL).
SPECIAL_WORDS = {"kl": "KL", "jsd": "JSD", "tvd": "TVD"}


def _source() -> str:
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def enums(text: str) -> dict[str, list[tuple[str, int]]]:
    """name -> [(entry, value)] of every ``enum Name : int { kA = 0, ... };``, in order."""
    out = {}
    for m in re.finditer(r"\benum\s+(\w+)\s*(?::\s*\w+\s*)?\{(.*?)\}\s*;", text, flags=re.S):
        entries = []
        for item in filter(None, (s.strip() for s in m.group(2).split(","))):
            em = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", item)
            assert em, f"enum {m.group(1)}: entry {item!r} needs an explicit '= N' value"
            entries.append((em.group(1), int(em.group(2))))
        assert m.group(1) not in out, f"enum {m.group(1)} is defined twice"
        out[m.group(1)] = entries
    return out


def layout_entry(prefix: str, column: str) -> str:
    return "k" + prefix + "".join(part.capitalize() for part in column.split("_"))


def divergence_entry(name: str) -> str:
    return "k" + "".join(SPECIAL_WORDS.get(w, w.capitalize()) for w in name.split("_"))


def expected(names, entry) -> list[tuple[str, int]]:
    return [(entry(n), i) for i, n in enumerate(names)]


@pytest.fixture(scope="module")
def header_enums():
    return enums(_source())


def test_entry_rules():
    assert layout_entry("NormCol", "log_s_a") == "kNormColLogSA"
    assert layout_entry("Stat", "z_label") == "kStatZLabel"
    assert [divergence_entry(n) for n in ("forward_kl", "skew_reverse_kl", "jsd", "tvd",
                                          "alpha")] == [
        "kForwardKL", "kSkewReverseKL", "kJSD", "kTVD", "kAlpha"]


@pytest.mark.parametrize("layout", layouts.MIRRORED, ids=lambda c: c.name)
def test_layout_enum_matches_python(header_enums, layout):
    assert layout.name in header_enums, f"csrc/row_math.h has no enum {layout.name}"
    want = expected(layout.names, lambda n: layout_entry(layout.name, n))
    want.append((f"k{layout.name}s", len(layout)))  # the count
    assert header_enums[layout.name] == want


def test_div_enum_matches_the_divergence_table(header_enums):
    want = [(divergence_entry(d.name), d.code) for d in TABLE] + [("kDivs", len(TABLE))]
    assert header_enums["Div"] == want


def test_enum_entries_are_unique(header_enums):
    # Unscoped enums share one namespace: a clash would fail to compile, but say where.
    seen = [e for entries in header_enums.values() for e, _ in entries]
    assert len(seen) == len(set(seen))


def has_mix_cases(text: str) -> set[str]:
    """The case labels of has_mix_terms that return true."""
    m = re.search(r"\bbool\s+has_mix_terms\s*\(\s*int\s+\w+\s*\)\s*\{(.*?)\n\}", text, flags=re.S)
    assert m, "csrc/row_math.h has no `bool has_mix_terms(int div)`"
    body = m.group(1)
    true_cases, pending = set(), []
    for tok in re.finditer(r"case\s+(\w+)\s*:|default\s*:|return\s+(true|false)\s*;", body):
        if tok.group(1):
            pending.append(tok.group(1))
        elif tok.group(0).startswith("default"):
            pending.append("default")
        else:
            if tok.group(2) == "true":
                true_cases.update(pending)
            pending = []
    assert "default" not in true_cases, "has_mix_terms must default to false"
    return true_cases


def test_has_mix_terms_lists_the_needs_mix_divergences():
    got = has_mix_cases(_source())
    assert got == {divergence_entry(d.name) for d in TABLE if d.needs_mix}


def test_triton_divergence_codes_follow_the_table():
    try:
        row_math = importlib.import_module("kdkernels.triton_kernels.row_math")
    except ImportError as err:  # no triton here: the C++ side is still checked above
        pytest.skip(f"kdkernels.triton_kernels.row_math does not import: {err}")
    assert row_math.DIVERGENCE_CODES == {d.name: d.code for d in TABLE}
