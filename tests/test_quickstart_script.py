"""scripts/quickstart.sh refuses a mistyped QUICKSTART_METHOD at once, before installing or evaluating anything."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "config_hub" / "finetune" / "smollm2-135m"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("method", ["etherplushh", "../llama-2-7b/ether"])
def test_unknown_method_fails_before_any_step_and_names_the_recipes(method):
    # PYTHON=false: had the script gone past its check, its first Python call would fail with another message
    env = dict(os.environ, QUICKSTART_METHOD=method, QUICKSTART_SKIP_INSTALL="1", PYTHON="false")
    r = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: QUICKSTART_METHOD={method} has no recipe")
    assert "==>" not in r.stderr  # no step started
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert names == ["ether", "etherplus", "etherplusHH", "lora", "oft"]
    listed = lines[0].rsplit("use one of ", 1)[1].rstrip(".").split()
    assert sorted(listed) == names
