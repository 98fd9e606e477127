"""The packages form layers that import one way (docs/architecture.md draws the graph):

    mqsa_core  <-  spark_jobs
    mqsa_core  <-  embeddings  <-  trainer  <-  mqsa_ted (export, recommend, report, the CLI)

and so do trainer's subpackages:

    trainer.data  <-  trainer.model  <-  trainer.evaluation  <-  trainer.runtime  <-  trainer.train

and reading a config stays light (no torch, DeepSpeed or Spark), so a bad setting is refused
before any heavy import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "mqsa_core": set(),
    "spark_jobs": {"mqsa_core"},
    "embeddings": {"mqsa_core"},
    "trainer": {"mqsa_core", "embeddings"},
    "mqsa_ted": {"mqsa_core", "spark_jobs", "embeddings", "trainer"},
}
# trainer's subpackages: each imports only those listed (and itself)
TRAINER_ALLOWED = {
    "data": set(),
    "model": {"data"},
    "evaluation": {"data", "model"},
    "runtime": {"data", "model", "evaluation"},
    "train": {"runtime"},
}


def imported_modules(path: Path) -> set[str]:
    """The absolute module names ``path`` imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages that ``path`` imports."""
    return {name.split(".")[0] for name in imported_modules(path)} & set(ALLOWED)


def test_every_import_points_down_the_layers():
    wrong = []
    for package, allowed in ALLOWED.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            for target in imported_packages(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_reading_a_config_imports_nothing_heavy():
    code = (
        "import sys; from mqsa_core.config import load_config;"
        "load_config(None, ['train.epochs=2']);"
        "heavy = ('torch', 'deepspeed', 'pyspark', 'torchrec');"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def trainer_parts(path: Path) -> set[str]:
    """trainer's subpackages (or ``train``) that ``path`` imports."""
    return {name.split(".")[1] for name in imported_modules(path) if name.startswith("trainer.")}


def test_trainer_subpackages_import_one_way():
    wrong = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        parts = path.relative_to(ROOT / "trainer").parts
        if parts == ("__init__.py",):
            continue
        part = parts[0].removesuffix(".py")
        assert part in TRAINER_ALLOWED, f"{path.relative_to(ROOT)}: no layer for trainer.{part}"
        for target in trainer_parts(path) - TRAINER_ALLOWED[part] - {part}:
            wrong.append(f"{path.relative_to(ROOT)} imports trainer.{target}")
    assert not wrong, "\n".join(wrong)


SECTION_TAKERS = ("embeddings", "trainer/data", "trainer/model", "trainer/evaluation")


def test_components_below_the_runtime_take_config_sections():
    """Only the runtime (the builder, checkpoints that hash the whole config, the run directory
    that writes it, tracking that logs it, warm start that compares two runs) and the commands
    see the whole ``Config``; the components take the sections they read (``DataConfig``, ...)."""
    wrong = []
    for folder in SECTION_TAKERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "mqsa_core.config":
                    if "Config" in {alias.name for alias in node.names}:
                        wrong.append(str(path.relative_to(ROOT)))
    assert not wrong, f"take config sections, not Config: {wrong}"
