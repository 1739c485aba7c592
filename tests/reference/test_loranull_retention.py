"""The method's claim in miniature (the paper's Table 1, DESIGN.md §5): after tuning on a new task,
lora_null_v2 keeps the facts the model knew while reaching the same task accuracy as full
fine-tuning, where plain lora and full fine-tuning forget them. Runs tests/bench/bench_retention.py's
experiment with three methods (~1 min on 2 cores)."""
import importlib.util
import pathlib

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "bench_retention.py"


def test_lora_null_v2_keeps_facts_at_equal_task_accuracy():
    spec = importlib.util.spec_from_file_location("bench_retention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    facts, task, facts0, task0, rows = bench.measure(["lora", "full", "lora_null_v2"])
    assert facts0 == 1.0 and task0 < 0.2  # the model knew the facts, not the task
    r = {m: (ta, fa, dr) for m, ta, fa, dr in rows}
    for m, (ta, fa, dr) in r.items():
        print(f"{m:14s} task {100 * ta:.0f}%  facts kept {100 * fa:.0f}%  drift {dr:.2e}")
    assert r["lora_null_v2"][0] >= r["full"][0] - 0.05      # same task accuracy as full fine-tuning
    assert r["lora_null_v2"][0] >= 0.9
    assert r["lora_null_v2"][1] >= 0.9                      # and the facts are kept
    assert r["lora_null_v2"][1] > r["lora"][1] + 0.5 and r["lora_null_v2"][1] > r["full"][1] + 0.5
    assert r["lora_null_v2"][2] * 100 < min(r["lora"][2], r["full"][2])
