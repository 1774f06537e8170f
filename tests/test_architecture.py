"""The structure that makes a divergence or an option cheap to add: one divergence table,
options as one object (the compile schema, the vocab-parallel checksum derive from it), an
oracle that shares no code with what it judges."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdkernels
from kdkernels import divergences
from kdkernels.backends.base import RowSpec
from kdkernels.engine import custom_ops
from kdkernels.layouts import CONSTS, MIX_KINDS, STATS_WEIGHTS
from kdkernels.options import KDOptions, option_fields
from kdkernels.parallel.loss_setup import settings_key
from kdkernels.parallel.shard_layout import checksum

ROOT = Path(__file__).resolve().parent.parent


# ---- Layers: read from every import (function-level ones included) with ast. ----------------
PKG = ROOT / "kdkernels"
APPLICATION = ("kdkernels.train", "kdkernels.cli", "kdkernels.serve")
# Units are the package's top-level modules and subpackages; the application's own
# subpackages and modules are units too, so that its layers are held to the same rules.
SPLIT_DEEPER = ("kdkernels.train", "kdkernels.serve")


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    for deeper in SPLIT_DEEPER:
        if module.startswith(deeper + "."):
            return ".".join(parts[:3])
    return ".".join(parts[:2])


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every kdkernels import in the
    file, at any depth of the syntax tree; ``from P import x`` of a submodule x counts as an
    import of P.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names
                      if a.name.split(".")[0] == "kdkernels"]
        elif isinstance(node, ast.ImportFrom):
            found += _imports_of(node, path)
    return found


def _imports_of(node: ast.ImportFrom, path: Path) -> list[tuple[str, str | None, int]]:
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "kdkernels":
        return []
    found = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        found.append((sub, None, node.lineno) if _is_module(sub)
                     else (source, alias.name, node.lineno))
    return found


def _unit_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: ["file:line", ...]}."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PKG.rglob("*.py")):
        here = _unit(_module_of(path))
        for target, _, line in _imports(path):
            there = _unit(target)
            if there != here:
                where = f"{path.relative_to(ROOT)}:{line}"
                graph.setdefault(here, {}).setdefault(there, []).append(where)
    return graph


def test_nothing_below_the_application_imports_it():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        module = _module_of(path)
        if module.startswith(APPLICATION):
            continue
        bad += [f"{path.relative_to(ROOT)}:{line} imports {target}"
                for target, _, line in _imports(path) if target.startswith(APPLICATION)]
    assert not bad, "the library imports the application:\n" + "\n".join(bad)


def test_no_import_cycle_between_units():
    graph = _unit_graph()
    cycles = []
    # A cycle is a unit that reaches itself again; report each one with its evidence.
    for start in sorted(graph):
        path, stack, seen = {start: None}, [start], set()
        while stack:
            unit = stack.pop()
            for nxt in graph.get(unit, {}):
                if nxt == start:
                    chain, u = [start], unit
                    while u is not None and u != start:
                        chain.insert(1, u)
                        u = path[u]
                    cycles.append(" -> ".join(chain + [start]) + "  (" + "; ".join(
                        f"{a}->{b}: {graph[a][b][0]}"
                        for a, b in zip(chain, chain[1:] + [start], strict=True)) + ")")
                elif nxt not in seen and nxt not in path:
                    seen.add(nxt)
                    path[nxt] = unit
                    stack.append(nxt)
    assert not cycles, "import cycles between units:\n" + "\n".join(sorted(set(cycles)))


def test_no_private_name_or_module_is_imported_across_units():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        here = _unit(_module_of(path))
        for target, name, line in _imports(path):
            if _unit(target) == here:
                continue
            private_module = any(p.startswith("_") and not p.startswith("__")
                                 for p in target.split("."))
            private_name = name is not None and name.startswith("_") and \
                not name.startswith("__")
            if private_module or private_name:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}"
                           + (f".{name}" if name else ""))
        bad += [f"{path.relative_to(ROOT)}:{line}: {target}.{attr}"
                for target, attr, line in _private_attribute_uses(path)
                if _unit(target) != here]
    assert not bad, "private names imported across units:\n" + "\n".join(bad)


def _private_attribute_uses(path: Path) -> list[tuple[str, str, int]]:
    """``mod._name`` where ``mod`` is a kdkernels module imported by this file (a private name
    reached through the module instead of imported)."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "kdkernels" and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            for target, name, _line in _imports_of(node, path):
                if name is None:
                    aliases[next(a.asname or a.name for a in node.names
                                 if target.endswith("." + a.name))] = target
    return [(aliases[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in aliases and n.attr.startswith("_")
            and not n.attr.startswith("__")]


@pytest.mark.parametrize("entry", ["kdkernels", "kdkernels.integrations.hf",
                                   "kdkernels.integrations.trl_loss", "kdkernels.cache"])
def test_importing_the_library_loads_no_application_module(entry):
    code = (f"import sys, {entry}\n"
            f"app = sorted(m for m in sys.modules if m.startswith({APPLICATION!r}))\n"
            "print(app)\nassert not app, app\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_layer_rules_see_function_level_imports(tmp_path):
    """The reader finds an import inside a function, relative or absolute."""
    pkg = ROOT / "kdkernels" / "engine"
    probe = pkg / "_layer_probe_test.py"
    probe.write_text("def f():\n    from ..train import pipeline\n    import kdkernels.cli\n")
    try:
        found = {t for t, _, _ in _imports(probe)}
    finally:
        probe.unlink()
    assert {"kdkernels.train.pipeline", "kdkernels.cli"} <= found


def test_the_table_is_the_list_of_divergences():
    assert kdkernels.DIVERGENCES == tuple(d.name for d in divergences.TABLE)
    assert [d.code for d in divergences.TABLE] == list(range(len(divergences.TABLE)))
    names = {f.name for f in option_fields()}
    for d in divergences.TABLE:
        assert set(d.params) <= names, (d.name, d.params)
        assert d.stats_weight in STATS_WEIGHTS
        # a divergence computed from the stats alone keeps one weighted sum; a mix one none
        assert (d.stats_weight == "none") == d.needs_mix, d.name


@pytest.mark.parametrize("name", kdkernels.DIVERGENCES)
def test_row_constants_come_from_the_table(name):
    opts = KDOptions(divergence=name, beta=0.3, skew=0.2, alpha=0.7, temperature=2.0,
                     student_softcap=5.0)
    spec = RowSpec.from_options(opts, True)
    div = divergences.get(spec.divergence)
    w_q, k_div = div.mixture(opts.divergence_params(div))
    assert len(spec.consts) == len(CONSTS)
    assert spec.const("inv_t") == 0.5 and spec.tempered and spec.const("tempered") == 1.0
    assert spec.const("cap_s") == 5.0 and spec.const("cap_t") == 0.0
    assert spec.const("w_q") == w_q and spec.const("k_div") == k_div
    assert spec.const("stats_weight") == getattr(STATS_WEIGHTS, div.stats_weight)
    assert spec.needs_mix == div.needs_mix and spec.code == div.code


def test_exact_mixture_weights_are_flagged():
    for skew, kind in ((0.0, "only_q"), (1.0, "only_p"), (0.4, "both")):
        spec = RowSpec.build("skew_reverse_kl", skew=skew)  # w_q = 1 - skew
        assert spec.const("mix_kind") == getattr(MIX_KINDS, kind)
    assert not RowSpec.build("forward_kl", temperature=1.0).tempered


def test_jsd_folds_at_the_ends_of_beta():
    assert RowSpec.build("jsd", beta=0.0).divergence == "forward_kl"
    assert RowSpec.build("jsd", beta=1.0).divergence == "reverse_kl"
    assert RowSpec.build("jsd", beta=0.5).divergence == "jsd"


def test_compile_schema_is_derived_from_the_options():
    names = [f.name for f in option_fields()]
    for op in (torch.ops.kdkernels.fused_linear_kd, torch.ops.kdkernels.kd_loss,
               torch.ops.kdkernels.fused_linear_kd_backward):
        args = [a.name for a in op.default._schema.arguments]
        assert args[-len(names):] == names, (op, args)
    assert custom_ops.OPTION_NAMES == tuple(names)


@pytest.mark.parametrize("rel", ["engine/custom_ops.py", "dense/compiled.py",
                                 "sparse/compiled.py"])
def test_compile_module_lists_no_option_by_hand(rel):
    """Nothing in the compile modules names an option except through the dataclass."""
    tree = ast.parse((ROOT / "kdkernels" / rel).read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    idents = {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    # "reduction" and "return_components" are read by name where the op must know them
    allowed = {"reduction", "return_components"}
    listed = ({f.name for f in option_fields()} - allowed) & (strings | idents)
    assert not listed, f"{rel} lists options by hand: {sorted(listed)}"


def test_vocab_parallel_settings_cover_every_option():
    base = KDOptions()
    key = checksum(settings_key(base))
    changed = dict(divergence="tvd", beta=0.4, skew=0.3, alpha=0.25, temperature=2.0,
                   scale_by_t2=False, kd_weight=0.5, ce_weight=0.1, student_softcap=3.0,
                   teacher_softcap=4.0, student_logit_scale=0.5, teacher_logit_scale=3.0,
                   ignore_index=-1, reduction="sum", num_items=7.0,
                   chunk_size=3, max_workspace_bytes=1 << 20, impl="torch",
                   return_components=True)
    assert set(changed) == {f.name for f in option_fields()}, "a new option needs a case here"
    for name, value in changed.items():
        other = dataclasses.replace(base, **{name: value})
        assert checksum(settings_key(other)) != key, name


def test_the_oracle_imports_nothing_from_the_package():
    tree = ast.parse((ROOT / "kdkernels" / "reference.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("kdkernels"), (
                ast.dump(node))
        elif isinstance(node, ast.Import):
            assert all(not a.name.startswith("kdkernels") for a in node.names)


def test_public_signatures_take_alpha_after_skew():
    import inspect

    for fn in (kdkernels.fused_linear_kd_loss, kdkernels.kd_loss):
        params = list(inspect.signature(fn).parameters)
        assert params[params.index("skew") + 1] == "alpha", fn.__name__
        p = inspect.signature(fn).parameters["alpha"]
        assert p.kind is p.KEYWORD_ONLY and p.default == 0.5
    fields = [f.name for f in option_fields()]
    assert fields[fields.index("skew") + 1] == "alpha"
    assert kdkernels.FusedLinearKDLoss(divergence="alpha", alpha=0.3).options["alpha"] == 0.3
    with pytest.raises(ValueError, match="alpha must be in the open interval"):
        kdkernels.FusedLinearKDLoss(alpha=1.0)


def test_no_stats_column_literals_in_the_driver_and_reducers():
    """Stats and coefficient columns are named (layouts.py), not integer literals."""
    for rel in ("engine/driver.py", "dense/rows.py", "row_stats.py", "divergences.py",
                "parallel/group_reducer.py"):
        tree = ast.parse((ROOT / "kdkernels" / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript):
                for sub in ast.walk(node.slice):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, int) and \
                            sub.value > 1:
                        raise AssertionError(f"{rel}:{node.lineno}: column literal "
                                             f"{sub.value}")


def test_dead_names_and_stale_pointers_are_gone():
    """The review's dead code and stale text (issue 14): a 0.1 package keeps no aliases."""
    from kdkernels import parallel
    from kdkernels.backends import registry
    from kdkernels.engine import local_reducer as reducer

    dead = [(parallel, "clear_layout_cache"), (registry, "IMPLS"), (custom_ops, "LOSS_KEYS"),
            (reducer, "LOSS_KEYS")]
    assert [f"{m.__name__}.{n}" for m, n in dead if hasattr(m, n)] == []
    sources = [p for p in (ROOT / "kdkernels").rglob("*.py")] + [ROOT / "setup.py"]
    for path in sources:
        text = path.read_text()
        assert "DEFAULT_MAX_WORKSPACE_BYTES_CUDA" not in text, path
        assert "backends/README" not in text, path
    names = [n.name for n in ast.walk(ast.parse((ROOT / "tests" / "test_invariants.py")
                                                .read_text())) if isinstance(n, ast.FunctionDef)]
    assert "test_reference_is_the_oracle_of_itself" not in names
    assert "test_reference_jsd_matches_trls_formula" in names


# ---- Options spelled once: KDOptions' fields reach every consumer with no edit. ------------
def _options_with_a_new_field() -> type:
    """KDOptions plus a field ``new_knob``, as adding it to the dataclass would make it."""
    return dataclasses.make_dataclass(
        "KDOptions", [("new_knob", "float", dataclasses.field(default=0.25))],
        bases=(KDOptions,), frozen=True, namespace={"__module__": KDOptions.__module__})


def test_a_new_option_reaches_topk_options_and_the_integrations(monkeypatch, tmp_path):
    """The top-k options are made from the dense dataclass, and each integration builds its
    options object from the class it names (monkeypatched here to the extended one), taking
    the option from its keywords with no edit."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1")
    from transformers import TrainingArguments

    from kdkernels.integrations import hf, hf_topk, trl_loss
    from kdkernels.sparse import options as sparse_options
    from tests._train_helpers import tiny_pair

    def dense_names(cls):
        return [f.name for f in option_fields(cls)
                if f.name not in sparse_options.TEACHER_LOGIT_OPTIONS]

    extended = _options_with_a_new_field()
    topk = sparse_options.topk_options_of(extended)
    assert [f.name for f in option_fields(topk)] == ["tail", *dense_names(extended)]
    assert [f.name for f in sparse_options.topk_option_fields()] == ["tail",
                                                                    *dense_names(KDOptions)]
    opts = topk(new_knob=0.5, temperature=2.0)
    assert opts.new_knob == 0.5 and opts.dense.new_knob == 0.5 and opts.values()[-1] == 0.5
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        topk(teacher_logit_scale=2.0)

    monkeypatch.setattr(hf, "KDOptions", extended)
    monkeypatch.setattr(hf_topk, "TopKOptions", topk)
    monkeypatch.setattr(trl_loss, "KDOptions", extended)
    student, teacher = tiny_pair()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = hf.KDTrainer(model=student, teacher_model=teacher, args=args, new_knob=0.5,
                           divergence="alpha", alpha=0.3)
    assert isinstance(trainer.kd_options, extended)
    assert (trainer.kd_options.new_knob, trainer.kd_options.alpha) == (0.5, 0.3)
    topk_trainer = hf_topk.TopKKDTrainer(model=student, args=args, new_knob=0.5, tail="zero")
    assert isinstance(topk_trainer.kd_options, topk) and topk_trainer.kd_options.new_knob == 0.5

    assert "new_knob" in trl_loss.extra_options()  # what KDDistillationTrainer takes
    seen = []
    loss_entry = trl_loss.fused_linear_kd

    def spy(*args, **kwargs):
        seen.extend(a for a in args if isinstance(a, KDOptions))
        return loss_entry(*args, **kwargs)

    monkeypatch.setattr(trl_loss, "fused_linear_kd", spy)
    g = torch.Generator().manual_seed(0)
    h, t = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    w, u = torch.randn(11, 8, generator=g), torch.randn(11, 8, generator=g)
    mask = torch.ones(2, 3, dtype=torch.long)
    trl_loss.fused_divergence_loss(h, t, w, u, mask, 0.3, temperature=2.0, new_knob=0.5)
    assert len(seen) == 1 and isinstance(seen[0], extended)
    assert (seen[0].new_knob, seen[0].beta, seen[0].temperature, seen[0].divergence) == (
        0.5, 0.3, 2.0, "jsd")


@pytest.mark.parametrize("name", ["FusedLinearKDLoss", "FusedLinearTopKKDLoss"])
def test_loss_modules_show_every_option_with_its_default(name):
    import inspect

    from kdkernels.sparse.options import topk_option_fields

    module = getattr(kdkernels, name)
    fields = option_fields() if name == "FusedLinearKDLoss" else topk_option_fields()
    function = (kdkernels.fused_linear_kd_loss if name == "FusedLinearKDLoss"
                else kdkernels.fused_linear_topk_kd_loss)
    params = inspect.signature(module).parameters
    assert list(params) == [f.name for f in fields] + ["vocab_parallel"]
    for f in fields:
        p = params[f.name]
        assert p.kind is p.KEYWORD_ONLY and p.default == f.default, f.name
        assert p.default == inspect.signature(function).parameters[f.name].default, f.name
    assert params["vocab_parallel"].default is None
