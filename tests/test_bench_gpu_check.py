"""bench/gpu_check.py without a GPU: it imports, its comparison and its PASS/FAIL table can fail, a check
that does not reach the code it checks fails instead of passing, and the bf16 parity check runs on CPU."""
import importlib.util
import io
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_table_and_exit_code():
    gc = load()
    out = io.StringIO()
    ok = [gc.Result("a", "PASS", "fine"), gc.Result("ep2_nccl", "SKIP", "needs 2 ranks")]
    assert gc.summarize(ok, out) == 0 and out.getvalue().splitlines()[-1] == "gpu_check: PASS"
    out = io.StringIO()
    assert gc.summarize(ok + [gc.Result("triton_kernels", "FAIL", "worst 3.1 x tolerance")], out) == 1
    assert "triton_kernels  FAIL    worst 3.1 x tolerance" in out.getvalue()
    assert out.getvalue().splitlines()[-1] == "gpu_check: FAIL (triton_kernels)"
    crashed = gc._guarded("x", lambda: 1 / 0)
    assert crashed.status == "FAIL" and "ZeroDivisionError" in crashed.detail
    if not torch.cuda.is_available():
        assert gc.main([]) == 2


def test_compare():
    gc = load()
    ref = torch.tensor([[5.0, 1.0, 0.0], [1.0, 1.05, 0.0]])
    assert gc.compare(ref + 0.05, ref, 0.1)[0]
    assert not gc.compare(ref + 0.2, ref, 0.1)[0]  # too far
    near = ref.clone()
    near[1] = torch.tensor([1.05, 1.0, 0.0])  # a near tie flips within the tolerance: fine
    ok, _, data = gc.compare(near, ref, 0.1)
    assert ok and data["clear_rows"] == 1 and data["top1_flips"] == 0 and abs(data["max_abs"] - 0.05) < 1e-6
    flipped = ref.clone()
    flipped[0] = torch.tensor([1.0, 5.0, 0.0])
    ok, detail, data = gc.compare(flipped, ref, 1.9)
    assert not ok and data["top1_flips"] == 1 and "top-1 changed on 1 clear rows" in detail


def test_checks_that_miss_their_path_fail_on_cpu(tmp_path):
    gc = load()
    r = gc.check_triton_kernels("cpu", cases=[(2, 16, 16, 1, 2)], dtypes=(torch.float32,))
    assert r.status == "FAIL" and "not taken" in r.detail
    path = str(tmp_path / "ck")
    gc.write_checkpoint(path)
    r = gc.check_cuda_graph_decode(path, "cpu")
    assert r.status == "FAIL" and "no CUDA graphs" in r.detail
    r = gc.check_bf16_vs_transformers(path, "cpu", torch.float32, 1e-4)  # the same check, fp32 on the CPU
    assert r.status == "PASS" and r.data["rows"] == 256 and r.data["clear_rows"] > 200, r
    r = gc.check_bf16_vs_transformers(path, "cpu", torch.bfloat16, 1e-4)  # and it can fail
    assert r.status == "FAIL" and r.data["max_abs"] > 1e-3


def test_gpu_mutation_runner_finds_installs_and_undoes_each_mutant(tmp_path):
    """tests/mutation_gpu.py (run on a GPU) judges the CUDA-branch mutants mutmut cannot: it must find every
    mutant of to_device and HostCopy.__init__ in mutmut's file (and nothing else), and put each in place and back."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import mutation_gpu

    from epkit.infer import sampling
    fake = tmp_path / "sampling.py"
    fake.write_text(
        "def x_to_device__mutmut_2(values, dtype, device):\n    return 'two'\n"
        "def x_to_device__mutmut_10(values, dtype, device):\n    return 'ten'\n"
        "def x_sample__mutmut_1(logits, batch):\n    return None\n"
        "class HostCopy:\n"
        "    def xǁHostCopyǁ__init____mutmut_3(self, t):\n        self.host, self.done = t * 0, None\n")
    found = mutation_gpu.mutants_in(str(fake))
    assert list(found) == ["xǁHostCopyǁ__init____mutmut_3", "x_to_device__mutmut_2", "x_to_device__mutmut_10"]
    orig_to_device, orig_init = sampling.to_device, sampling.HostCopy.__init__
    undo = mutation_gpu.put_in_place("to_device", "x_to_device__mutmut_10", found["x_to_device__mutmut_10"][1])
    assert sampling.to_device([1], torch.int64, "cpu") == "ten"
    undo()
    assert sampling.to_device is orig_to_device
    undo = mutation_gpu.put_in_place("HostCopy.__init__", "xǁHostCopyǁ__init____mutmut_3",
                                     found["xǁHostCopyǁ__init____mutmut_3"][1])
    assert sampling.HostCopy(torch.tensor([5, 6])).get() == [0, 0]
    undo()
    assert sampling.HostCopy.__init__ is orig_init and sampling.HostCopy(torch.tensor([5, 6])).get() == [5, 6]
