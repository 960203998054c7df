"""The torch-free boundary: every module that promises not to import torch imports with torch made unimportable.

The read-only commands (status, report, export) and everything they read (the typed config, the store, the
analysis, the placement record and exports) live on this side, so they start in a fraction of a second and
run where torch is not installed. A module that starts importing torch at the top breaks this test.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import loraplace

# Whole packages on the torch-free side: a module added to them is checked without being listed here.
TORCH_FREE_PACKAGES = ("loraplace.core", "loraplace.analysis", "loraplace.cli", "loraplace.store")
# Torch-free modules of the packages that also hold torch code.
TORCH_FREE_MODULES = (
    "loraplace", "loraplace.model", "loraplace.model.estimate", "loraplace.model.conditioning", "loraplace.model.quantize",
    "loraplace.model.experts",
    "loraplace.placement", "loraplace.placement.strategy", "loraplace.placement.resolve",
    "loraplace.placement.select", "loraplace.placement.record", "loraplace.placement.export", "loraplace.placement.peft",
    "loraplace.placement.variants", "loraplace.placement.variants.dora", "loraplace.placement.variants.pissa",
    "loraplace.placement.variants.adalora",
    "loraplace.data", "loraplace.data.examples", "loraplace.data.sources", "loraplace.data.builtin",
    "loraplace.data.tokenize", "loraplace.data.answers",
    "loraplace.train", "loraplace.train.schedule", "loraplace.train.result", "loraplace.train.progress",
    "loraplace.study", "loraplace.study.plan", "loraplace.study.tune", "loraplace.measure", "loraplace.measure.probe_scores", "loraplace.measure.kappa", "loraplace.study.tracking", "loraplace.study.race",
)
BLOCKED = ("torch", "transformers", "peft", "accelerate")

CHILD = """
import importlib, importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked: this module must stay torch-free")
        return None

sys.meta_path.insert(0, Block())
failed = []
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except ImportError as e:
        failed.append(f"{{name}}: {{e}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    out = list(TORCH_FREE_MODULES)
    for pkg in TORCH_FREE_PACKAGES:
        module = __import__(pkg, fromlist=["_"])
        out.append(pkg)
        out += [m.name for m in pkgutil.walk_packages(module.__path__, pkg + ".") if not m.name.endswith("__main__")]
    return out


def test_torch_free_modules_import_without_torch():
    modules = _modules()
    assert "loraplace.core.config" in modules and "loraplace.analysis.report" in modules and "loraplace.cli.main" in modules
    proc = subprocess.run([sys.executable, "-c", CHILD.format(blocked=BLOCKED, modules=modules)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_the_check_catches_a_module_that_imports_torch():
    """The same check on a module that does import torch fails: the block is real."""
    proc = subprocess.run([sys.executable, "-c", CHILD.format(blocked=BLOCKED, modules=["loraplace.train.loss"])],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "torch is blocked" in proc.stdout


def test_every_module_is_on_one_side_or_imports_torch():
    """A new module in a mixed package must be placed: listed as torch-free, or it imports torch (and so is
    not what a read-only command may import)."""
    listed = set(_modules())
    torch_side = {"loraplace.model.anatomy", "loraplace.model.reading", "loraplace.model.loading", "loraplace.data.batches",
                  "loraplace.train.trial", "loraplace.train.checkpoint", "loraplace.train.loss", "loraplace.train.sequential", "loraplace.train.fused",
                  "loraplace.train.prefix", "loraplace.train.memory", "loraplace.train.guard", "loraplace.train.generate",
                  "loraplace.train.segments", "loraplace.measure.forgetting",
                  "loraplace.study.workspace", "loraplace.study.executor", "loraplace.study.run", "loraplace.study.session",
                  "loraplace.study.phases", "loraplace.measure.probe",
                      "loraplace.measure.eva", "loraplace.measure.zero_shot"}
    every = {m.name for m in pkgutil.walk_packages(loraplace.__path__, "loraplace.") if not m.name.endswith("__main__")}
    assert every - listed - torch_side == set(), "place the new module(s) in TORCH_FREE_MODULES or torch_side"
    assert not listed & torch_side
