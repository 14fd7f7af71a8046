"""Write the family x method x path matrix of docs/backbones.md from the tests' own cases: run
tests/test_families.py (one small random configuration per family, tests/family_cases.py), read each check's
outcome, and replace the section between the markers in docs/backbones.md.

    python docs/gen_backbones.py                    # runs the checks (a few minutes on a CPU), then writes the page
    python docs/gen_backbones.py --junit report.xml # writes it from an earlier run's pytest --junitxml report
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "backbones.md"
BEGIN, END = "<!-- family-matrix:begin -->", "<!-- family-matrix:end -->"

# test function -> the column it fills, and what it checks
PATHS = {
    "test_every_method_backpropagates_at_the_input_size": (
        "forward + backward", "every method the family takes, at the backbone's input size"),
    "test_train_runs_every_method_and_caches_the_frozen_blocks": (
        "train + registry", "`train()` of every method, the registered version's logits == the trained tensors' "
        "(within 1e-5); an adapter in the last block trains on cached frozen blocks"),
    "test_registry_round_trip_and_mixed_batches_equal_each_task_alone": (
        "mixed == alone", "every method (and three in the last block only) saved, loaded by a `Predictor`: loaded == "
        "in memory, and `logits_mixed` == each task alone"),
    "test_merged_equals_unmerged": ("merged == unmerged", "lora, ssf, bitfit"),
    "test_frozen_prefix_of_routed_prediction_equals_a_full_pass": (
        "routed prefix", "the trunk split at every block == the class's own forward, bit for bit; the frozen "
        "prefix of routed prediction with linear and last-block adapter, lora, vpt tasks == a full pass"),
    "test_a_failed_attach_leaves_the_backbone_bit_identical": (
        "failed attach", "lora, ssf, bitfit, vpt failing mid-attach: modules, weights and another task's logits "
        "bit-identical"),
    "test_onnx_graph_equals_adaptkit": (
        "ONNX == adaptkit", "one task's graph (vpt where the family takes it, else lora) within 1e-4; several tasks "
        "in one graph for eva02 and beit"),
    "test_peft_export_and_import_equal_adaptkit": (
        "PEFT == adaptkit", "LoRA exported, loaded by `peft.PeftModel` and imported back; on qkv layers whose "
        "attention adds its own q/v bias the export is refused (PEFT cannot express it), and proj/fc2 are used"),
}


def run_checks(junit: Path | None = None) -> dict[tuple[str, str], list[str]]:
    """(test, case key) -> outcomes ("passed", "failed", "skipped") of tests/test_families.py (run now, or read from
    the ``junit`` report of a run with ``ADAPTKIT_FULL_MATRIX=1``)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = junit or Path(tmp) / "report.xml"
        env = {**os.environ, "ADAPTKIT_FULL_MATRIX": "1", "PYTHONPATH": str(ROOT),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if junit is None:
            subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_families.py"), "-q",
                            f"--junitxml={report}", "-p", "no:cacheprovider"], cwd=ROOT, env=env, check=False)
        tree = ET.parse(report)
    out: dict[tuple[str, str], list[str]] = {}
    for case in tree.iter("testcase"):
        name = case.get("name", "")
        test, _, param = name.partition("[")
        key = param.rstrip("]").split("-")[0]
        state = ("failed" if case.find("failure") is not None or case.find("error") is not None else
                 "skipped" if case.find("skipped") is not None else "passed")
        out.setdefault((test, key), []).append(state)
    return out


def table(outcomes: dict[tuple[str, str], list[str]]) -> str:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import timm
    from family_cases import CASES

    from adaptkit.families import family_of
    from adaptkit.methods import METHODS, get_method

    head = ["family (timm class)", "methods"] + [column for column, _ in PATHS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    refusals = []
    for case in CASES:
        model = timm.create_model(case.name, num_classes=0)
        takes = [m for m in METHODS if get_method(m).refusal(model) is None]
        for m in METHODS:
            why = get_method(m).refusal(model)
            if why:
                refusals.append(f"- **{case.label}**: `{m}` is refused before anything is built: {why}.")
        if family_of(model).other_head:
            refusals.append(f"- **{case.label}**: PEFT export is refused: {family_of(model).other_head}, so PEFT's "
                            "copy of the timm model would not be the task.")
        cells = []
        for test in PATHS:
            states = outcomes.get((test, case.key), [])
            cells.append("n/a" if not states else "pass" if all(s == "passed" for s in states) else
                         "skipped" if all(s == "skipped" for s in states) else "**FAIL**")
        label = f"{case.label} (`{case.timm_name}`, {type(model).__name__}, {family_of(model).name})"
        lines.append("| " + " | ".join([label, ", ".join(takes), *cells]) + " |")
    notes = [f"- *{column}*: {what}." for column, what in PATHS.values()]
    return "\n".join([*lines, "", "What each column checks:", "", *notes, "", *refusals])


def main() -> None:
    text = PAGE.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{PAGE} has no {BEGIN} ... {END} section to replace")
    junit = Path(sys.argv[sys.argv.index("--junit") + 1]) if "--junit" in sys.argv else None
    matrix = table(run_checks(junit))
    before, rest = text.split(BEGIN, 1)
    PAGE.write_text(f"{before}{BEGIN}\n{matrix}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
