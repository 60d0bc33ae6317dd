"""The README's set-up commands are the ones CI runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    commands = re.findall(r"^    (pip install .*)$", readme, flags=re.M)
    assert len(commands) >= 2, "README must open with the install+main-job and install+tests commands"
    test_cmd = [c for c in commands if "pytest" in c]
    assert test_cmd and test_cmd[0] in ci
    main_cmd = [c for c in commands if "pytest" not in c][0]
    script = main_cmd.split("&&")[-1].split()[-1]
    assert os.path.exists(os.path.join(ROOT, script)), script
