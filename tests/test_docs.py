"""The docs agree with the results they cite, and point nowhere a reader cannot follow."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("tables_from_json", ROOT / "scripts" / "tables_from_json.py")
tables_from_json = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables_from_json)

# (doc, result file): the doc holds the table scripts/tables_from_json.py makes of the file, unchanged; for the
# demo that is the table the command prints (moecomm.demo.run.result_table)
CITED = [("docs/experts.md", "docs/results/2026-11-29-h200/experts.json"),
         ("docs/demo.md", "docs/results/2026-12-03-cpu/demo.json"),
         ("docs/demo.md", "docs/results/2026-12-03-cpu/demo_topk4.json"),
         ("docs/demo.md", "docs/results/2026-12-03-cpu-xeon/demo.json"),
         ("docs/benchmarks.md", "docs/results/2026-11-29-h200/demo.json"),
         ("docs/benchmarks.md", "docs/results/2026-12-03-h200/combine_kernels.json"),
         ("docs/accuracy.md", "docs/results/2026-12-03-cpu/combine_accuracy.json"),
         ("docs/accuracy.md", "docs/results/2026-12-03-cpu/demo_combine.json")]
_spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "scripts" / "bench_tables.py")
bench_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_tables)
# (doc, benchmark, result file): every table scripts/bench_tables.py makes of the file is in the doc, unchanged
BENCH_CITED = [("docs/benchmarks.md", "collectives", "docs/results/2026-11-30-h200x2/coll_ws2b.json"),
               ("docs/benchmarks.md", "moe", "docs/results/2026-11-30-h200x2/moe_ws1.json"),
               ("docs/benchmarks.md", "moe", "docs/results/2026-11-30-h200x2/moe_ws2b.json"),
               ("docs/benchmarks.md", "counted", "docs/results/2026-12-03-h200/counted_ws1.json"),
               ("docs/benchmarks.md", "shared", "docs/results/2026-12-03-h200/shared_ws1.json")]


@pytest.mark.parametrize("doc, result", CITED)
def test_doc_tables_are_generated_from_the_json_they_cite(doc, result):
    table = tables_from_json.table(json.loads((ROOT / result).read_text()))
    assert table.count("\n") > 2
    assert table in (ROOT / doc).read_text(), f"regenerate {doc}'s table: python scripts/tables_from_json.py {result}"
    assert result in (ROOT / doc).read_text()


@pytest.mark.parametrize("doc, bench, result", BENCH_CITED)
def test_benchmark_tables_are_generated_from_the_json(doc, bench, result):
    tables = [t for t in getattr(bench_tables, bench)(ROOT / result).split("\n\n") if t.count("\n") > 2]
    assert tables
    text = (ROOT / doc).read_text()
    for table in tables:
        assert table in text, f"regenerate {doc}'s table: python scripts/bench_tables.py {bench} {result}"


@pytest.mark.parametrize("result", ["docs/results/2026-12-03-cpu/demo.json", "docs/results/2026-12-03-cpu-xeon/demo.json"])
def test_readme_demo_paragraph_matches_the_recorded_demo(result):
    """The README's demo paragraph quotes docs/demo.md's runs (two processors, other last digits): cosines, byte
    ratios and NVFP4's mean cosine hold for both."""
    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("It prints, per dispatch strategy"):readme.index("(docs/demo.md)")]
    runs = {(r["name"], r["split"]): r for r in json.loads((ROOT / result).read_text())["strategies"]}
    floor = float(re.search(r"bf16 rounding \(cosine > ([\d.]+)\)", paragraph).group(1))
    assert all(runs[s, split]["cosine_min"] > floor for s in ("allreduce", "agrs") for split in ("uneven", "idle"))
    bf16 = runs["agrs", "uneven"]["wire_bytes_per_token"]
    fp8, nvfp4 = (runs[s, "uneven"]["wire_bytes_per_token"] / bf16 for s in ("agrs-fp8", "agrs-nvfp4"))
    assert f"carry {fp8:.2f}x and {nvfp4:.2f}x the bytes" in paragraph
    assert f"NVFP4: mean cosine {runs['agrs-nvfp4', 'uneven']['cosine_mean']:.4f}" in paragraph


def test_tables_from_json_reads_old_and_new_keys():
    """Result files keep the keys they were written with; the bench experts keys were renamed since."""
    old = {"format": "fp8", "weights": "fp8-channel", "tokens": 128, "local_rows": 169, "seconds": 8.34e-4,
           "tflops": 17.86, "bare_seconds": 7.53e-4, "ratio": 1.107, "graphed_seconds": None,
           "graphed_bare_seconds": None, "graphed_ratio": None}
    new = {tables_from_json._RENAMED.get(k, k): v for k, v in old.items()}
    assert set(new) - set(old) == {"token_format", "weight_format", "ratio_vs_bare", "graphed_ratio_vs_bare"}
    row = "| fp8 | fp8-channel | 128 | 169 | 0.834 | 18 | 0.753 | 1.11 | n/a | n/a | n/a |"
    for record in (old, new):
        data = {"meta": {"command": "moecomm bench experts --json x.json"}, "results": [record]}
        assert tables_from_json.table(data).splitlines()[-1] == row
    with pytest.raises(ValueError, match="not a result file"):
        tables_from_json.table({"meta": {"command": "moecomm demo --json x.json"}, "config": {}})


# Where a reader meets the project: no pointer into the project's issue tracker, which a reader cannot open.
READABLE = sorted(
    str(p.relative_to(ROOT))
    for pattern in ("README.md", "docs/*.md", "src/moecomm/**/*.py", "examples/*.py", "scripts/*")
    for p in ROOT.glob(pattern)
    if p.is_file()
)


@pytest.mark.parametrize("path", READABLE)
def test_no_references_a_reader_cannot_follow(path):
    text = (ROOT / path).read_text()
    found = re.findall(r"\bissue ?#?\d+|\bthe issue\b|\bissue's\b", text, flags=re.I)
    assert not found, f"{path}: {found}"


def test_readme_links_the_bench_guide():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/bench.md)" in readme
    assert "## How to read the bench tables" in (ROOT / "docs" / "bench.md").read_text()


def test_readme_links_the_integration_guide_in_its_first_screen():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:24])
    assert "(docs/integration.md)" in first_screen and "(examples/integration.py)" in first_screen
    guide = (ROOT / "docs" / "integration.md").read_text()
    for section in ("## Where `sizes` comes from", "## What `auto` picks, and why", "## NVFP4: the global scale",
                    "## CUDA graphs", "## torch.compile", "## What the engines' flags correspond to",
                    "## Device-count mode: one CUDA graph per rank", "## Shared experts and micro-batch overlap"):
        assert section in guide, section


# Repository paths a reader is told about (`tests/x.py`, `moecomm/demo/minilm.py`, ...): each exists, or is a script
# that a recorded run names and docs/benchmarks.md sends to the git history
_REPO_PATH = re.compile(r"(?<![\w/.$-])((?:src|tests|examples|scripts|docs|moecomm)/[\w./-]*\w)")
IN_GIT_HISTORY = {"scripts/quant_tile_sweep.py", "scripts/quant_gpu_run.sh", "scripts/quant_sweep.py",
                  "scripts/quant_gpu_final.sh"}


@pytest.mark.parametrize("path", READABLE)
def test_repository_paths_named_exist(path):
    named = set(_REPO_PATH.findall((ROOT / path).read_text()))
    missing = sorted(p for p in named - IN_GIT_HISTORY if not (ROOT / p).exists() and not (ROOT / "src" / p).exists())
    assert not missing, f"{path} names paths that are not in the repository: {missing}"


def test_scripts_named_only_in_the_git_history_are_said_to_be_there():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert all(script in text for script in IN_GIT_HISTORY)
    assert "scripts/quant_tile_sweep.py` is in the git history" in text


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_and_their_anchors_resolve(doc):
    for link in re.findall(r"\]\(([^)\s]+)\)", (ROOT / doc).read_text()):
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (ROOT / doc).parent / target if target else ROOT / doc
        assert path.exists(), f"{doc}: link to {link}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{doc}: link to {link}: no such heading"
