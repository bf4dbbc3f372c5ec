# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""MLflow runs after an error: none is left RUNNING, and a rerun resumes the same runs."""

from __future__ import annotations

import mlflow
import pytest

from monai_icmil.handlers.tracking import MLflowRunTree, sqlite_tracking_uri
from monai_icmil.workflows import ICMILWorkflow


def _statuses(tmp_path) -> dict[str, str]:
    client = mlflow.MlflowClient(tracking_uri=sqlite_tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("icmil").experiment_id])
    return {run.info.run_name: run.info.status for run in runs}


def test_a_failed_run_marks_its_open_runs_failed_and_a_rerun_resumes_them(tmp_path):
    tree = MLflowRunTree(tmp_path)
    done = tree.phase(0, "embed")
    tree.end(done)
    phase = tree.phase(0, "bag_phase")
    tree.abandon("FAILED")
    assert _statuses(tmp_path) == {
        "icmil": "FAILED", "round_0": "FAILED", "round_0/embed": "FINISHED", "round_0/bag_phase": "FAILED",
    }  # fmt: skip
    again = MLflowRunTree(tmp_path).phase(0, "bag_phase")
    assert again.run_id == phase.run_id  # the same run, resumed
    assert _statuses(tmp_path)["round_0/bag_phase"] == "RUNNING" and _statuses(tmp_path)["icmil"] == "RUNNING"


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_the_workflow_ends_its_runs_when_a_phase_raises(tmp_path, error, status):
    wf = ICMILWorkflow(str(tmp_path), str(tmp_path), progress=False)

    def failing_prepare():
        wf.tracking.phase(0, "embed")  # a phase under way
        raise error

    wf.prepare = failing_prepare
    with pytest.raises(type(error)):
        wf.run()
    assert set(_statuses(tmp_path).values()) == {status}


def test_a_single_phase_command_that_raises_leaves_no_run_running(tmp_path):
    """``bag_phase#run`` (the workflow's ``bag_phase`` on its own): its runs end FAILED; a phase inside another
    command leaves the ending to the outermost one."""
    wf = ICMILWorkflow(str(tmp_path), str(tmp_path), progress=False)

    def failing_embed(r=0):
        wf.tracking.phase(r, "embed")  # a phase under way
        raise RuntimeError("boom")

    wf.prepare = lambda: {}
    wf.embed = failing_embed
    with pytest.raises(RuntimeError, match="boom"):
        wf.bag_phase(0)
    assert set(_statuses(tmp_path).values()) == {"FAILED"}
    calls = []
    wf.run_round = wf.bag_phase
    wf.tracking.abandon = lambda status="FAILED": calls.append(status)
    with pytest.raises(RuntimeError, match="boom"):
        wf.run()  # run -> bag_phase -> embed: ended once, by run
    assert calls == ["FAILED"]


def test_a_run_name_with_a_quote_is_found_again_and_a_broken_state_json_is_named(tmp_path):
    from monai_icmil.handlers.tracking import start_run
    from monai_icmil.workflows.ledger import PhaseLedger

    uri = sqlite_tracking_uri(tmp_path)
    first = start_run(uri, "icmil", "patient's run")
    assert start_run(uri, "icmil", "patient's run").run_id == first.run_id  # resumed, not a second run
    (tmp_path / "state.json").write_text('{"rounds": {"0": {')
    with pytest.raises(ValueError, match=r"state\.json' \(the run's record of finished phases\) is not valid JSON"):
        PhaseLedger(tmp_path / "state.json").get(0, "embed")


def test_a_resumed_run_given_other_params_keeps_them_as_tags_and_warns(tmp_path):
    from monai_icmil.handlers.tracking import start_run

    uri = sqlite_tracking_uri(tmp_path)
    run = start_run(uri, "icmil", "bag_phase")
    run.log_params({"lr": 0.001, "epochs": 50, "embed.num_workers": 4})
    again = start_run(uri, "icmil", "bag_phase")  # the interrupted phase, rerun (on a machine with fewer cores)
    with pytest.warns(UserWarning, match=r"resumed with other values of lr;"):
        again.log_params({"lr": 0.01, "epochs": 50, "seed": 1, "embed.num_workers": 2})
    data = again.client().get_run(again.run_id).data
    assert data.params == {"lr": "0.001", "epochs": "50", "seed": "1", "embed.num_workers": "4"}
    assert data.tags["changed_param.lr"] == "0.01" and "changed_param.epochs" not in data.tags
    assert "changed_param.embed.num_workers" not in data.tags
