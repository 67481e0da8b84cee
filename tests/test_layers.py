"""The package's layering (docs/architecture.md, "Layers"): no module imports one of a higher layer.

Every `import vqd_scale.X` / `from vqd_scale.X import …` in vqd_scale/, module level or inside a
function, is read with `ast`; a lazy import is still a dependency.
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vqd_scale"

# Lowest first. A module belongs to the longest matching prefix.
LAYERS = [
    ["errors", "compat"],
    ["config"],
    ["diffusion", "models"],
    ["data", "interop", "generate", "distributed", "rundir",
     "eval", "eval.metrics", "eval.plots", "eval.heldout", "eval.quality", "eval.ranks"],
    ["families"],
    ["train", "eval.job", "eval.watch"],
    ["launch", "cli"],
]
# Same layer, but neither may know the other: evaluation reads a run directory, never training's internals.
APART = [("train", "eval"), ("eval", "train")]


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, matched prefix) of a dotted module name relative to vqd_scale."""
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    if best is None:
        raise AssertionError(f"vqd_scale.{module} is in no layer: add it to LAYERS (and docs/architecture.md)")
    return best


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module relative to vqd_scale) of every vqd_scale import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vqd_scale"):
            base = node.module[len("vqd_scale"):].lstrip(".")
            for a in node.names:  # `from vqd_scale.eval import metrics`: the submodule is the dependency
                sub = f"{base}.{a.name}".lstrip(".")
                is_module = (PKG / sub.replace(".", "/")).with_suffix(".py").exists() or (PKG / sub.replace(".", "/")).is_dir()
                out.append((node.lineno, sub if is_module else base))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name[len("vqd_scale."):]) for a in node.names if a.name.startswith("vqd_scale."))
    return out


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            yield ".".join(parts), path


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_no_module_imports_a_higher_layer(module, path):
    mine, my_name = layer_of(module)
    for line, target in imports_of(path):
        theirs, their_name = layer_of(target)
        assert theirs <= mine, (f"vqd_scale/{path.relative_to(PKG)}:{line} imports vqd_scale.{target} "
                                f"(layer {theirs}: {their_name}) from layer {mine} ({my_name})")
        for a, b in APART:
            assert not (module.startswith(a) and target.startswith(b)), \
                f"vqd_scale/{path.relative_to(PKG)}:{line}: {a} must not import {b} (vqd_scale.{target})"


def test_the_checker_sees_lazy_imports_and_refuses_upward_ones(tmp_path):
    """The test would fail on the imports this layering removed (models → data, config → diffusion)."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from vqd_scale.data.clusters import load_clusters\n")
    assert imports_of(p) == [(2, "data.clusters")]
    assert layer_of("models.prior")[0] < layer_of("data.clusters")[0]
    assert layer_of("config")[0] < layer_of("diffusion.presets")[0]
    assert layer_of("families.vqd.task")[0] < layer_of("train.metrics")[0]
