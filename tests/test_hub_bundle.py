"""The Hub bundle: what `save_pretrained` emits loads with trust_remote_code where only torch, transformers,
safetensors and pillow (and what they need) are importable; and it is exactly the project's sources, flattened."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import asymoe
from asymoe import AsyMoEForConditionalGeneration
from asymoe.tiny import build_tokenizer, tiny_config, tiny_llava, tiny_processor
from isolated import ALLOWED_DISTRIBUTIONS, AUTO_CLASSES, ISOLATED_SCRIPT, closure, isolated_site, run_isolated

REPO = Path(__file__).resolve().parents[1]
BUNDLE_SOURCES = {
    "configuration_asymoe.py": REPO / "configuration" / "configuration_asymoe.py",
    "modeling_asymoe.py": REPO / "modeling_asymoe" / "modeling_asymoe.py",
    "hyperbolic_asymoe.py": REPO / "modeling_asymoe" / "hyperbolic_asymoe.py",
    "processing_asymoe.py": REPO / "processing" / "processing_asymoe.py",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny AsyMoE (model + processor) and the logits of the saving process on a fixed input."""
    directory = tmp_path_factory.mktemp("bundle")
    tokenizer = build_tokenizer("what color is the shape red blue".split())
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = AsyMoEForConditionalGeneration(config).eval()
    processor = tiny_processor(config, tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_bundle_loads_in_isolated_interpreter(checkpoint, tmp_path):
    """Every Auto class loads and generates with only torch/transformers/safetensors/pillow importable."""
    proc = run_isolated(tmp_path, ISOLATED_SCRIPT, str(checkpoint), ",".join(AUTO_CLASSES))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["config"] == "AsyMoEConfig" and result["processor"] == "AsyMoEProcessor"
    models = result["models"]
    for name in AUTO_CLASSES:
        assert models[name]["class"] == "AsyMoEForConditionalGeneration"
        assert models[name]["module"].startswith("transformers_modules"), "must run the bundle's remote code"
        assert len(models[name]["new_tokens"]) >= 1
    # Same weights, same code: every Auto class computes the same thing, and the same as in this process.
    sums = {models[name]["logits_sum"] for name in AUTO_CLASSES}
    assert len(sums) == 1
    assert sums.pop() == pytest.approx(_local_logits_sum(checkpoint), rel=1e-6)
    assert result["pipeline"]["role"] == "assistant"


def _local_logits_sum(directory: Path) -> float:
    """The isolated script's input, run through the installed package's classes."""
    import numpy as np
    from PIL import Image

    from asymoe.processing import AsyMoEProcessor

    model = AsyMoEForConditionalGeneration.from_pretrained(directory).eval()
    processor = AsyMoEProcessor.from_pretrained(directory)
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        return float(model(**processor(images=image, text=prompt, return_tensors="pt")).logits.double().sum())


VERSION_SCRIPT = textwrap.dedent(
    """
    import sys
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    # What a user with another release would have (set after the imports, which can re-import the package).
    sys.modules["transformers"].__version__ = sys.argv[2]
    AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
    AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
    AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    """
)


def test_bundle_guards_its_transformers_range(checkpoint, tmp_path):
    """The checkpoint records the transformers releases its code was tested on; under an older one loading stops
    with the minimum to install, under a newer one it warns once, naming the newest tested release."""
    tested = json.loads((checkpoint / "config.json").read_text())["tested_transformers"]
    assert tested == asymoe.configuration.configuration_asymoe.TESTED_TRANSFORMERS
    site = isolated_site(tmp_path)

    older = run_isolated(tmp_path, VERSION_SCRIPT, str(checkpoint), "5.16.1", site=site)
    assert older.returncode != 0
    assert f"needs transformers >= {tested['minimum']}" in older.stderr and "5.16.1 is installed" in older.stderr

    newer = run_isolated(tmp_path, VERSION_SCRIPT, str(checkpoint), "5.99.0", site=site)
    assert newer.returncode == 0, newer.stderr[-4000:]
    warned = [line for line in newer.stderr.splitlines() if "newer and untested" in line]
    assert len(warned) == 1 and f"to {tested['newest']}" in warned[0] and "5.99.0 is newer" in warned[0]

    tested_newest = run_isolated(tmp_path, VERSION_SCRIPT, str(checkpoint), tested["newest"], site=site)
    assert tested_newest.returncode == 0 and "untested" not in tested_newest.stderr


def test_isolated_site_excludes_toolkit(tmp_path):
    """The isolation is real: the toolkit packages are outside the closure this test exposes."""
    allowed = closure(ALLOWED_DISTRIBUTIONS)
    assert {"torch", "transformers", "numpy", "safetensors", "pillow"} <= allowed
    assert not {"asymoe", "trl", "peft", "datasets", "evaluate", "accelerate"} & allowed


def _split_relative_imports(text: str) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """The lines of `text` with its relative imports blanked, and those imports as (level, module, names)."""
    lines = text.splitlines()
    imports = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level:
            imports.append((node.lineno, node.level, node.module or "", [alias.name for alias in node.names]))
            lines[node.lineno - 1 : node.end_lineno] = [""] * (node.end_lineno - node.lineno + 1)
    return lines, [entry[1:] for entry in sorted(imports)]


def test_emitted_files_are_the_flattened_sources(checkpoint):
    """The bundle is generated, never hand-kept: each file equals its source with imports made flat."""
    for name, source in BUNDLE_SOURCES.items():
        emitted_text, emitted_imports = _split_relative_imports((checkpoint / name).read_text())
        source_text, source_imports = _split_relative_imports(source.read_text())
        assert emitted_text == source_text, name  # everything but the relative imports, verbatim
        assert [(module.split(".")[-1], names) for _, module, names in source_imports] == [
            (module, names) for _, module, names in emitted_imports], name
        for level, module, _ in emitted_imports:  # flat siblings, as the Hub loader follows them
            assert level == 1 and f"{module}.py" in BUNDLE_SOURCES, (name, module)
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {
        "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoProcessor"
    }
    for reference in auto_map.values():
        module, cls = reference.split(".")
        assert f"class {cls}(" in (checkpoint / f"{module}.py").read_text()
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_asymoe.AsyMoEProcessor"}


@pytest.mark.parametrize("name", sorted(BUNDLE_SOURCES))
def test_bundle_imports_only_torch_transformers_numpy_stdlib_and_siblings(name):
    """Remote code may import torch, transformers (and NumPy, which transformers requires), the standard library and
    flat siblings — nothing else."""
    tree = ast.parse(BUNDLE_SOURCES[name].read_text())
    allowed_roots = {"torch", "transformers", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            # transformers ignores imports inside try/except (optional toolkit hooks such as from_dense)
            for inner in ast.walk(node):
                inner._in_try = True
        if getattr(node, "_in_try", False):
            continue
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = (node.module or "").split(".")[-1]
                assert f"{module}.py" in BUNDLE_SOURCES, f"{name} imports non-bundle sibling {node.module}"
                continue
            roots = {node.module.split(".")[0]}
        else:
            continue
        assert roots <= allowed_roots, f"{name} imports {roots - allowed_roots}"


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory) -> tuple[Path, str]:
    """The project's wheel, built from this checkout, and the build's log (`-v`: the build backend's output)."""
    directory = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(directory),
         str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (built,) = directory.glob("asymoe-*.whl")
    return built, build.stdout + build.stderr


@pytest.fixture(scope="module")
def wheel(wheel_build) -> Path:
    return wheel_build[0]


def test_wheel_builds_without_setuptools_warnings(wheel_build):
    """pyproject.toml uses nothing setuptools deprecates (e.g. a `license` table, which stops building in 2027) and
    lists every folder it installs files from."""
    warnings = sorted({line.strip() for line in wheel_build[1].splitlines() if re.search(r"\b\w+Warning\b:", line)})
    assert not warnings, "\n".join(warnings)


def test_wheel_installs_one_namespace(wheel):
    """The built wheel installs everything under `asymoe` (no generic top-level `configuration`, `eval`, ...)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {name.split("/")[0] for name in names} == {"asymoe", f"{wheel.name.split('-')[0]}-{asymoe.__version__}.dist-info"}
    for module in ("configuration/configuration_asymoe.py", "modeling/modeling_asymoe.py",
                   "modeling/hyperbolic_asymoe.py", "processing/processing_asymoe.py", "cli.py"):
        assert f"asymoe/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read(f"asymoe-{asymoe.__version__}.dist-info/entry_points.txt").decode()
    assert "asymoe = asymoe.cli:main" in entry_points
    # Package data (files loaded by path: metric modules, recipes, accelerate configs, the demo's dense start), every
    # file of the source tree.
    root = Path(__file__).resolve().parents[1]
    for source, installed, pattern in (("eval/metrics", "asymoe/eval/metrics", "*/*.py"),
                                       ("configuration/recipes", "asymoe/configuration/recipes", "*.yaml"),
                                       ("configuration/accelerate", "asymoe/configuration/accelerate", "*.yaml"),
                                       ("asymoe/checkpoints/dense_start", "asymoe/checkpoints/dense_start", "*")):
        files = sorted((root / source).glob(pattern))
        assert files, source
        for path in files:
            assert f"{installed}/{path.relative_to(root / source).as_posix()}" in names, path


def test_model_only_install_upcycles(wheel, tmp_path):
    """`pip install asymoe` without the toolkit (torch, transformers, safetensors, pillow): `asymoe upcycle` works,
    a toolkit command says what to install."""
    site = isolated_site(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    tokenizer = build_tokenizer("what color is the shape red blue".split())
    dense, processor = tiny_llava(tokenizer)
    dense.save_pretrained(tmp_path / "dense")
    processor.save_pretrained(tmp_path / "dense")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONNOUSERSITE="1")

    def asymoe_cli(*args: str) -> subprocess.CompletedProcess:
        code = (f"import sys; sys.path.insert(0, {str(site)!r}); from asymoe.cli import main; "
                f"sys.exit(main({list(args)!r}))")
        return subprocess.run([sys.executable, "-S", "-s", "-c", code], capture_output=True, text=True, env=env,
                              timeout=600, cwd=tmp_path)

    assert "DST" in asymoe_cli("upcycle", "--help").stdout
    upcycled = asymoe_cli("upcycle", str(tmp_path / "dense"), str(tmp_path / "asymoe"))
    assert upcycled.returncode == 0, upcycled.stderr[-4000:]
    assert "deviation from the source" in upcycled.stdout
    assert (tmp_path / "asymoe" / "config.json").exists() and list((tmp_path / "asymoe").glob("*.safetensors"))
    toolkit = asymoe_cli("eval", "--help")
    assert toolkit.returncode != 0 and "pip install 'asymoe[toolkit]'" in toolkit.stderr
