"""launch/infer.py (JSONL in, JSONL out, bad lines fail alone, default checkpoint resolution) and a tiny
in-process run of bench/generate.py, so the GPU benchmark cannot rot unnoticed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from epkit.infer import LLM, SamplingParams
from epkit.infer.cli import main, resolve_checkpoint
from test_infer import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_jsonl_in_order_with_bad_lines(tmp_path, capsys):
    ck = make_checkpoint(str(tmp_path / "ck"), seed=3, tokenizer=True)
    lines = [{"prompt": "the quick brown fox", "max_tokens": 5},
             {"prompt_token_ids": [5, 6, 7], "max_tokens": 4, "temperature": 0.7, "seed": 1},
             {"prompt": ""},
             "this is not json",
             {"prompt_token_ids": [5, 999]},
             {"prompt": "to be or", "top_p": 0},
             {"prompt": "to be or", "max_tokens": -3},
             {"prompt": "to be or", "temprature": 0.5},
             {"prompt": "a stitch in time", "max_tokens": 6, "stop": ["zzz"]}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    out = tmp_path / "out.jsonl"
    # exit 3: some requests failed (each has its error line), the others were served
    assert main(["--checkpoint", ck, "--prompts", str(src), "--output", str(out), "--no-progress"]) == 3
    res = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["index"] for r in res] == list(range(len(lines)))
    errors = {2: "empty prompt", 3: "line 4", 4: "token id 999", 5: "top_p=0", 6: "max_tokens=-3", 7: "temprature"}
    for i, r in enumerate(res):
        if i in errors:
            assert r["finish_reason"] == "error" and errors[i] in r["error"] and r["token_ids"] == [], r
            assert set(r) == {"index", "text", "token_ids", "finish_reason", "timings", "error"}, r  # one shape
        else:
            assert r["finish_reason"] in ("stop", "length") and "error" not in r, r
            assert set(r) >= {"text", "token_ids", "finish_reason", "timings"}
    # Defaults from configs/infer/default.yaml are greedy: line 0 equals the library's greedy output.
    llm = LLM(ck)
    ref = llm.generate(["the quick brown fox", [5, 6, 7]],
                       [SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=0.7, seed=1,
                                                                                   max_tokens=4)])
    assert [res[0]["token_ids"], res[1]["token_ids"]] == [o.token_ids for o in ref]
    assert res[0]["text"] == ref[0].text and res[1]["text"] == ref[1].text
    err = capsys.readouterr().err
    assert "tokens/s" in err and "expert load" in err and "6 failed" in err
    # --compare: the same requests again agree with the first result; a changed result file does not.
    args = ["--checkpoint", ck, "--prompts", str(src), "--output", str(tmp_path / "again.jsonl"), "--no-progress"]
    assert main(args + ["--compare", str(out)]) == 3  # they agree; the bad lines still failed
    assert "9/9 requests token-identical" in capsys.readouterr().err
    res[1]["token_ids"][0] += 1
    res[8]["token_ids"] = res[8]["token_ids"][:-1]
    (tmp_path / "changed.jsonl").write_text("\n".join(json.dumps(r) for r in res) + "\n")
    assert main(args + ["--compare", str(tmp_path / "changed.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "7/9 requests token-identical" in err and "outputs DIFFER in request(s) 1, 8\n" in err, err


def test_default_checkpoint_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(None) is None  # no outputs/default: the tiny preset
    run_dir = tmp_path / "outputs" / "default"
    make_checkpoint(str(run_dir / "final"), seed=4)
    assert resolve_checkpoint(None) == os.path.join("outputs/default", "final")
    assert resolve_checkpoint(str(run_dir)) == os.path.join(str(run_dir), "final")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_checkpoint(str(tmp_path))


def test_no_arguments_serves_default_and_imports_no_datasets(tmp_path):
    """`python launch/infer.py` with no arguments (no outputs/default here): the tiny preset, built-in prompts."""
    code = ("import sys, runpy; sys.argv = ['infer.py']; "
            f"r = runpy.run_path({os.path.join(ROOT, 'launch', 'infer.py')!r}, run_name='not_main')['run']([]); "
            "assert r == 0, r; assert 'datasets' not in sys.modules, 'inference imported datasets'; "
            "web = [m for m in ('fastapi', 'uvicorn', 'prometheus_client') if m in sys.modules]; "
            "assert not web, f'offline inference imported {web}'")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    res = [json.loads(l) for l in p.stdout.splitlines()]
    # the preset is served with the shipped tokenizer: built-in text prompts, up to 64 tokens each
    assert len(res) == 4 and all(isinstance(r["text"], str) for r in res)
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 64
               or r["finish_reason"] == "stop" and r["token_ids"][-1] == 2 for r in res)
    assert "preset tiny" in p.stderr and "tokens/s" in p.stderr


def test_bench_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(ROOT, "bench", "generate.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    # 16 new tokens: 15 decode steps stand well clear of a loaded machine's jitter on the 1-token run (with 4, the
    # 4-token run once took no longer than the 1-token one, and a decode rate needs their difference)
    assert bench.main(["--preset", "tiny", "--batch-sizes", "1,3", "--prompt-len", "8", "--new-tokens", "16",
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["config"]["ep"] == 1 and [row["batch"] for row in r["epkit"]["rows"]] == [1, 3]
    assert [row["batch"] for row in r["transformers"]["rows"]] == [1, 3]
    assert all(row["decode_tokens_per_s"] > 0 for side in ("epkit", "transformers") for row in r[side]["rows"])


def test_readme_stdin_example_on_a_fresh_checkout(tmp_path):
    """No checkpoint anywhere: the tiny preset is served with the shipped tokenizer, so text prompts work."""
    line = json.dumps({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0.8, "seed": 0})
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "infer.py"), "--no-progress"], input=line,
                         capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 6 and isinstance(out["text"], str)


def test_ep_must_match_the_launched_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--ep 1 x --dp 1 = 1 rank\\(s\\), but 2 rank\\(s\\) were launched.*pass --dp 2"):
        main(["--ep", "1", "--preset", "tiny", "--no-progress", "--output", str(tmp_path / "r.jsonl")])
    # under a launcher the results need a file: its log lines share stdout
    with pytest.raises(ValueError, match="under a launcher the results would share stdout .* pass --output FILE"):
        main(["--preset", "tiny", "--no-progress"])
    with pytest.raises(FileNotFoundError, match="--prompts nope.jsonl: no such file"):
        main(["--prompts", "nope.jsonl"])


def test_output_prompts_and_compare_are_checked_before_any_work(tmp_path, monkeypatch):
    """Checked before a model is built (issue 9 item 4): nothing runs only to lose its results at the end."""
    import epkit.infer.cli as cli
    monkeypatch.setattr(cli, "build_llm", lambda cfg: pytest.fail("built the model before checking the files"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"index": 0, "token_ids": [1]}\nnot json\n')
    cases = [(["--output", str(prompts)], ValueError, "is the --prompts file"),
             (["--output", str(tmp_path)], ValueError, "is a directory"),
             (["--output", str(prompts / "r.jsonl")], ValueError, f"{prompts} is a file, not a directory"),
             (["--output", "/proc/epkit-results.jsonl"], ValueError, "--output /proc/epkit-results.jsonl: /proc is not "
                                                                      "writable"),
             (["--compare", str(tmp_path / "missing.jsonl")], FileNotFoundError, "--compare .*: no such file"),
             (["--compare", str(tmp_path / "bad.jsonl")], ValueError, "line 2 is not a result line"),
             (["--compare", str(tmp_path / "blank.jsonl")], ValueError, "blank.jsonl holds no results")]
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    for argv, kind, message in cases:
        with pytest.raises(kind, match=message):
            main(["--prompts", str(prompts), "--no-progress", *argv])
    assert prompts.read_text() == json.dumps({"prompt": "hello"}) + "\n"


def test_results_are_kept_as_they_finish(tmp_path, capsys, monkeypatch):
    """A failure mid-run (a dead rank) keeps every finished result in OUTPUT.partial (issue 9 item 4)."""
    ck = make_checkpoint(str(tmp_path / "ck"), seed=3)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": [5, 6, 7], "max_tokens": n, "ignore_eos": True}) + "\n"
                           for n in (40, 1, 2, 40)) + "not json\n")
    steps = []
    real = LLM.step

    def dying_step(self):
        steps.append(1)
        if len(steps) == 5:
            raise RuntimeError("rank 1 stopped answering")
        return real(self)

    monkeypatch.setattr(LLM, "step", dying_step)
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="stopped answering"):
        main(["--checkpoint", ck, "--prompts", str(src), "--output", str(out), "--no-progress"])
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl.partial").read_text().splitlines()]
    assert sorted(r["index"] for r in kept) == [1, 2, 4]  # the two short requests and the bad line
    assert not out.exists()
    assert "3 finished result(s) are in" in capsys.readouterr().err
    monkeypatch.setattr(LLM, "step", real)  # the same run to the end: the ordered file, no partial left
    main(["--checkpoint", ck, "--prompts", str(src), "--output", str(out), "--no-progress"])
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_engine_settings_and_recipe_keys_are_refused(tmp_path):
    """--max-model-len 0, negative or beyond the model's context, and unknown recipe keys (issue 9 item 7)."""
    ck = make_checkpoint(str(tmp_path / "ck"), seed=3)  # max_position_embeddings 256
    for value, message in [("0", "max_model_len=0 must be a positive integer"),
                           ("-5", "max_model_len=-5 must be a positive integer"),
                           ("100000", r"max_model_len=100000 is beyond the model's context \(max_position_embeddings"
                                      r"=256\)")]:
        with pytest.raises(ValueError, match=message):
            main(["--checkpoint", ck, "--max-model-len", value, "--no-progress"])
    with pytest.raises(ValueError, match="max_model_len=0 must be"):
        LLM.from_model(__import__("epkit").load_pretrained(ck), max_model_len=0)
    (tmp_path / "bad.yaml").write_text("max_tokens: 8\nmax_model_length: 64\n")
    with pytest.raises(ValueError, match="unknown setting\\(s\\) max_model_length"):
        main(["--checkpoint", ck, "--config", str(tmp_path / "bad.yaml"), "--no-progress"])


def test_bad_device_and_ep_size_are_one_line(tmp_path, capsys):
    """--device banana / cuda:0 without CUDA, load_pretrained(ep_size=0): one sentence each (issue 9 item 12)."""
    import runpy

    import epkit
    ck = make_checkpoint(str(tmp_path / "ck"), seed=3)
    launcher = runpy.run_path(os.path.join(ROOT, "launch", "infer.py"), run_name="not_main")["run"]
    capsys.readouterr()  # transformers' save progress bars
    cuda = "no CUDA device" if not __import__("torch").cuda.is_available() else "CUDA device(s)"
    for device, message in [("banana", "device 'banana' is not a device; use cpu, cuda or cuda:N"),
                            ("cuda:0" if cuda == "no CUDA device" else "cuda:99", cuda)]:
        assert launcher(["--checkpoint", ck, "--device", device, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error (rank 0): device") and message in err[0], err
    for bad in (0, -1, 2.0, "2"):
        with pytest.raises(ValueError, match=f"ep_size={bad!r} must be an integer of at least 1"):
            epkit.load_pretrained(ck, ep_size=bad)
    with pytest.raises(ValueError, match="device 'banana' is not a device"):
        epkit.load_pretrained(ck, device="banana")
