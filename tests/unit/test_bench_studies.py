"""The bench writers put each study in docs/benchmarks/<study>/ (report.md, results.json,
chart.png) with links that resolve there. Re-renders every saved study from its own
results.json into a temporary tree: no benchmark runs, no QEMU (the machine lines and charts
are stubbed)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from bench import (
    bench_clone,
    bench_cluster,
    bench_engine,
    bench_ha,
    bench_hosts,
    bench_migrate_ckp,
    bench_replicate,
    bench_service,
    common,
    report,
    run,
)
from bench.common import BENCHMARKS, Case, Study, load_cases

from tests.unit.test_doc_links import broken_links

Writer = Callable[[list[Case], dict[str, str], Study], str]


def writer(study: str) -> Writer:
    if study == "peer":
        return report.write
    if study == "hosts":
        return bench_hosts.write
    if study == "service":
        return bench_service.write
    if study == bench_migrate_ckp.STUDY.name:
        return bench_migrate_ckp.write
    if study == bench_replicate.STUDY.name:
        return bench_replicate.write
    if study == bench_ha.HA.name:
        return bench_ha.write
    if study == "clone":
        return bench_clone.write
    if study == bench_cluster.STUDY.name:
        return bench_cluster.write
    assert study.startswith("engine"), f"{study}: which bench writes this study?"
    return bench_engine.write


STUDIES = sorted(d.name for d in BENCHMARKS.iterdir() if d.is_dir())


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    def chart(cases: list[Case], path: Path) -> bool:
        path.write_bytes(b"")
        return True

    # the writers' headers (common.report_header) describe the machine they run on
    monkeypatch.setattr(common, "machine", lambda: ["- (machine)"])
    monkeypatch.setattr(report, "chart", chart)
    monkeypatch.setattr(bench_engine, "_chart", chart)


def test_every_study_folder_has_a_writer() -> None:
    assert {"peer", "engine", "hosts"} <= set(STUDIES)
    for s in STUDIES:
        writer(s)


@pytest.mark.usefixtures("stubbed")
@pytest.mark.parametrize("name", STUDIES)
def test_a_study_renders_into_its_own_folder(tmp_path: Path, name: str) -> None:
    shutil.copy(BENCHMARKS / "analysis.md", tmp_path / "analysis.md")
    saved = BENCHMARKS / name / "results.json"
    study = Study(name, root=tmp_path)
    writer(name)(*load_cases(saved), study)
    assert study.results.read_text() == saved.read_text()  # every sample kept, unchanged
    assert study.report.read_text().startswith("# ")
    assert {p.name for p in tmp_path.iterdir()} == {"analysis.md", name}
    assert broken_links(study.report) == []


def test_a_study_is_one_folder_name() -> None:
    assert Study("engine-ab").dir == BENCHMARKS / "engine-ab"
    assert Study("peer").analysis("many-hosts") == "../analysis.md#many-hosts"
    for bad in ("", "a/b", "../x", ".hidden"):
        with pytest.raises(ValueError):
            Study(bad)


@pytest.mark.usefixtures("stubbed")
def test_bench_run_report_re_renders_the_peer_study(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m bench.run report`, the cheapest real path through the writer."""
    study = Study("peer", root=tmp_path)
    study.dir.mkdir()
    shutil.copy(report.PEER.results, study.results)
    monkeypatch.setattr(report, "PEER", study)
    run.main(["report"])
    assert sorted(p.name for p in study.dir.iterdir()) == ["chart.png", "report.md",
                                                            "results.json"]
    assert study.results.read_text() == (BENCHMARKS / "peer" / "results.json").read_text()
