"""The package's layers as README's "Code layout" lists them: every module in exactly one layer, and every import
of ours — at the top of a file or inside a function — goes to the importer's own layer or a lower one."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "carvana_jax"
HEADER = re.compile(r"^── (\d) (\w+) ──")
MODULE = re.compile(r"(?<![\w.])((?:[a-z_]+/)*[a-z_]+\.py|[a-z_]+/)")  # a file, or a package: all its modules


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package but the packages' own __init__ files (which hold no code)."""
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def readme_layers() -> dict[str, int]:
    """{module or package prefix: layer} from README's Code layout block (its indented lines under a layer header)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Code layout"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    layers, layer = {}, None
    for line in block.splitlines():
        header = HEADER.match(line)
        if header:
            layer = int(header.group(1))
        elif line.startswith("  ") and layer is not None:
            for token in MODULE.findall(" ".join(line.split("`")[0::2])):
                name = "carvana_jax." + token.removesuffix(".py").removesuffix("/").replace("/", ".")
                assert name not in layers, f"README lists {token} twice"
                layers[name] = layer
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int:
    """A module's layer: its own entry, or its package's (bench/ stands for every module in it)."""
    while module not in layers:
        assert "." in module, f"{module} is in no layer of README's Code layout"
        module = module.rsplit(".", 1)[0]
    return layers[module]


def imports_of(path: pathlib.Path, modules) -> set[str]:
    """The package's modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name in modules}


def test_every_module_is_in_exactly_one_layer():
    layers = readme_layers()
    modules = _modules()
    assert set(range(5)) == set(layers.values())
    for name in modules:
        layer_of(name, layers)
    packages = {_module_name(p.parent) for p in PACKAGE.rglob("__init__.py")}
    listed = set(layers) - packages
    assert listed <= set(modules), f"README lists modules that do not exist: {sorted(listed - set(modules))}"


def test_no_module_imports_a_higher_layer_and_only_bench_imports_bench():
    layers, modules = readme_layers(), _modules()
    upward, into_bench = [], []
    for name, path in modules.items():
        for target in imports_of(path, modules):
            if layer_of(target, layers) > layer_of(name, layers):
                upward.append(f"{name} (layer {layer_of(name, layers)}) imports {target} "
                              f"(layer {layer_of(target, layers)})")
            if target.startswith("carvana_jax.bench") and not name.startswith("carvana_jax.bench"):
                into_bench.append(f"{name} imports {target}")
    assert not upward, "\n".join(upward)
    assert not into_bench, "\n".join(into_bench)


def test_the_checks_see_an_upward_import(tmp_path):
    """The parser finds imports inside functions and the layer lookup ranks them (so the test above can fail)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from carvana_jax import train\n    import carvana_jax.data.kaggle\n")
    modules = _modules()
    assert imports_of(path, modules) == {"carvana_jax.train", "carvana_jax.data.kaggle"}
    layers = readme_layers()
    assert layer_of("carvana_jax.train", layers) > layer_of("carvana_jax.errors", layers)
    assert layer_of("carvana_jax.bench.torch_twin", layers) == layer_of("carvana_jax.cv", layers)
