"""The soak benchmark's bookkeeping (benchmarks/soak.py): what counts as left behind, and by whom.

The soak itself needs the whole stack and ~20 minutes; these check the parts that decide its verdict.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks import soak


def test_marked_finds_only_processes_carrying_the_soak_marker():
    since = time.time()
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, soak.MARK: "m1", soak.FLOW_RUN_VAR: "run-a"})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, soak.MARK: "someone-else"})
    try:
        found = soak.marked("m1", since)
        assert [(pid, v["flow_run"]) for (pid, _), v in found.items()] == [(ours.pid, "run-a")]
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
    assert soak.marked("m1", since) == {}


def test_left_behind_compares_by_pid_and_start_time():
    before = {(10, 1.0): "a", (11, 2.0): "b"}
    after = {(10, 1.0): "a", (11, 9.0): "b again (pid reused)", (12, 3.0): "c"}
    assert soak.left_behind(before, after) == [{"pid": 11, "cmd": "b again (pid reused)"}, {"pid": 12, "cmd": "c"}]


def test_tmp_entries_lists_tmp_and_ray_sessions(tmp_path):
    (tmp_path / "ray" / "session_1_42").mkdir(parents=True)
    (tmp_path / "x.sock").write_text("")
    assert soak.tmp_entries(tmp_path) == {"ray", "ray/session_1_42", "x.sock"}
    assert soak.tmp_entries(tmp_path / "missing") == set()


def test_classify_tmp_attributes_by_pid_port_runtime_folder_and_model(tmp_path):
    new = {"ray/session_2026-11-30_14-20-29_257105_28556", "ray/session_2026-11-30_14-20-41_159029_29012",
           "seaweedfs-filer-grpc-37563.sock", "seaweedfs-filer-grpc-40000.sock", "tunepipe-abc", "tunepipe-def",
           "weed.vm.root.log.INFO.20261130-141444.28556", "tmpk_833zef", "tmpmodel", "tmpothermodel"}
    for name, model in (("tmpmodel", soak.MODEL), ("tmpothermodel", f"{soak.MODEL}-2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "registered_model_meta").write_text(f"model_name: {model}\nmodel_version: '1'\n")
    out = soak.classify_tmp(new, our_pids={28556}, our_ports={37563}, runtime_dir="tunepipe-abc", tmp=tmp_path)
    assert out["ours"] == ["ray/session_2026-11-30_14-20-29_257105_28556", "seaweedfs-filer-grpc-37563.sock",
                           "tmpmodel", "tunepipe-abc", "weed.vm.root.log.INFO.20261130-141444.28556"]
    assert set(out["others"]) == new - set(out["ours"])


def test_growth_pct_and_version_checks():
    assert soak.growth_pct({"s3": 100.0, "mlflow": 0.0}, {"s3": 109.0}) == {"s3": 9.0, "mlflow": None}
    distinct = [{"run_id": "a", "data_version": "1"}, {"run_id": "b", "data_version": "2"}]
    assert soak.check_versions(distinct, completed=2) == {"count": 2, "distinct_source_runs": 2,
                                                          "data_versions": 2, "ok": True}
    assert not soak.check_versions([*distinct, {"run_id": "a", "data_version": "1"}], completed=3)["ok"]
    assert not soak.check_versions(distinct, completed=1)["ok"]  # more versions than runs


def test_new_data_arrives_atomically_one_file_per_run(tmp_path):
    lines = ["h\n", *(f"{i}\n" for i in range(soak.FIRST_ROWS + 3 * soak.ROWS_PER_RUN))]
    counts = [soak._arrive(tmp_path, i, lines) for i in range(3)]
    assert counts == [soak.FIRST_ROWS, soak.ROWS_PER_RUN, soak.ROWS_PER_RUN]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day-000.csv", "day-001.csv", "day-002.csv"]
    second = (tmp_path / "day-001.csv").read_text().splitlines()
    assert second[:2] == ["h", str(soak.FIRST_ROWS)]  # its own header, then the rows after the first file's


def test_table_flags_rss_growth_over_target():
    report = {"runs_completed": 2, "runs_wanted": 2, "trigger": "interval schedule", "interval_s": 45,
              "model_versions": {"count": 2, "distinct_source_runs": 2, "data_versions": 2, "ok": True},
              "processes_left_after_down": [], "flow_run_processes_alive_after_their_run": [],
              "tmp_left": {"ours": [], "others": ["x"]},
              "rss_mb": {"after_run_1": {"s3": 100.0, "worker": 100.0},
                         "after_last_run": {"s3": 150.0, "worker": 101.0},
                         "growth_pct": {"s3": 50.0, "worker": 1.0}}}
    text = soak.table(report)
    assert "2/2" in text and "(ok)" in text
    s3_line, worker_line = (ln for ln in text.splitlines() if ln.startswith(("s3", "worker")))
    assert "+50.0" in s3_line and "over 10 %" in s3_line
    assert "over" not in worker_line
