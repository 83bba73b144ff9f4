"""The layers stay apart at run time: each check imports in a fresh interpreter and reads ``sys.modules``.

``tests/test_import_graph.py`` reads the same boundaries from the source; this file checks what an
import really loads (a module-level import anywhere on the way counts, a function-level one only
once called), which is what a reward server or a user's ``import tpm`` pays for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("policies", "rewards")
APP = "tpm.app"
# Parts of a module name that say "written for the tests".
TEST_NAMES = ("tests", "testing", "conftest")


def loaded_after(code: str) -> list[str]:
    """The modules of tpm, policies and rewards loaded after running ``code`` in a fresh interpreter."""
    probe = (f"{code}\nimport json, sys\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('tpm', 'policies', 'rewards') "
             "or m.split('.')[0] in ('pytest', '_pytest'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _is(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _test_named(mod: str) -> bool:
    return any(part in TEST_NAMES or part.startswith("test_") for part in mod.split("."))


def shipped_modules(*packages: str) -> list[str]:
    out = []
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue  # running it is running the command line
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_import_tpm_alone_loads_no_plugins_and_no_sampler():
    loaded = loaded_after("import tpm")
    assert loaded == ["tpm"], f"import tpm loaded more than itself: {loaded}"


def test_import_rewards_loads_no_trainer_sampler_policy_or_app():
    loaded = loaded_after("import rewards")
    crossed = [m for m in loaded if _is(m, "tpm.grpo", "tpm.sampler", "tpm.policy", APP, "policies")]
    assert not crossed, f"import rewards (what a reward server loads) pulled in {crossed}"


def test_the_core_loads_no_plugins_and_no_app_layer():
    core = [m for m in shipped_modules("tpm") if not _is(m, APP)]
    loaded = loaded_after("\n".join(f"import {m}" for m in core))
    crossed = [m for m in loaded if _is(m, *PLUGINS, APP)]
    assert not crossed, f"importing every tpm module outside {APP} loaded {crossed}"


def test_the_plugins_load_no_app_layer():
    loaded = loaded_after("import policies\nimport rewards\n" + "\n".join(
        f"import {m}" for m in shipped_modules(*PLUGINS)))
    assert not [m for m in loaded if _is(m, APP)], loaded


def test_no_shipped_module_loads_a_test_named_module():
    loaded = loaded_after("\n".join(f"import {m}" for m in shipped_modules("tpm", *PLUGINS)))
    assert "tpm.app.train" in loaded  # everything was imported
    offenders = [m for m in loaded if _test_named(m) or _is(m, "pytest", "_pytest")]
    assert not offenders, f"shipped modules loaded test-named modules: {offenders}"


def test_the_checks_see_a_crossing():
    # A check that cannot fail checks nothing: the app layer does load the plug-ins.
    loaded = loaded_after("import tpm.app.train\nimport tpm.app.cli\ntpm.app.cli.resolve_policies('synchronous')")
    assert "policies" in loaded and "tpm.grpo" in loaded
    assert _test_named("tpm.testing") and not _test_named("tpm.testbed")
