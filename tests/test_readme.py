"""The README's set-up commands are the ones CI runs."""
import json
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


def _section(readme: str, title: str) -> str:
    return readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _commands(text: str) -> list[str]:
    """The indented shell lines of a README section, continuation lines joined, comments dropped."""
    out = []
    for l in text.splitlines():
        if not l.startswith("    "):
            continue
        l = l.strip()
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + l
        else:
            out.append(l)
    return [c.split("  #")[0].strip() for c in out]


def test_readme_serve_examples_hold_together():
    """Files the Serve lines read ship in the repo or are written by an earlier line; launched lines write their
    results to --output (issue 9 item 18)."""
    import shlex
    readme = open(os.path.join(ROOT, "README.md")).read()
    written = set()
    commands = [c for c in _commands(_section(readme, "Serve")) if "launch/infer.py" in c]
    assert len(commands) >= 3
    for command in commands:
        words = shlex.split(command.split("|")[-1])
        read = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--prompts", "<")]
        for file in read:
            assert os.path.isfile(os.path.join(ROOT, file)), f"{command}: {file} is not in the repository"
        compare = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--compare"]
        assert all(f in written for f in compare), f"{command}: reads {compare}, which no earlier line writes"
        written |= {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--output", ">")}
        if words[0] in ("deepspeed", "torchrun", "accelerate"):
            assert "--output" in words, f"{command}: results would share stdout with the launcher's log lines"
        assert all(w.startswith("outputs/") for w in written if "/" in w), written
    assert "runs/" not in readme, "one run path (outputs/default) throughout"
    assert re.search(r'strategy="balanced", loads=', readme), "the README must show that balanced needs loads="
    assert "download.pytorch.org/whl/cpu" in readme and "ninja" in readme
    timing = re.search(r"On 2 CPU cores .*? the main job takes about (\d+) minutes and the tests\s+about (\d+) minutes",
                       readme, flags=re.S)
    assert timing, "the set-up section says how long the main job and the tests take on 2 cores"


def test_readme_stdin_serve_line_runs_on_a_fresh_clone(tmp_path):
    """The Serve section's stdin line, verbatim, in a copy of the repository with no outputs/ yet."""
    import shutil
    import subprocess
    readme = open(os.path.join(ROOT, "README.md")).read()
    line = next(c for c in _commands(_section(readme, "Serve")) if c.startswith("python launch/infer.py <"))
    for folder in ("epkit", "launch", "configs"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK")}
    p = subprocess.run(["bash", "-c", line], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = line.split(">")[-1].strip()
    results = [json.loads(l) for l in open(tmp_path / out)]
    assert [r["index"] for r in results] == list(range(5)) and all(r["finish_reason"] != "error" for r in results)
