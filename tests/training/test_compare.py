"""training.compare: a tiny two-objective, two-seed comparison end to end (DeepSpeed subprocesses
on the session's tiny prepared data), its resumption (a half-finished run resumes, finished runs
and evaluations are reused), the report's numbers recomputed from the runs' own files, the
learning-rate sweep, and the one-line errors of bad command lines."""

import gzip
import json
import statistics
import subprocess
import sys

import pytest
import torch

from training import compare, compare_runs
from training.config import EXAMPLE_CORPUS

METRICS = {  # results.json name -> path in sonarllm.evaluate's result
    "cross_entropy": ("cross_entropy",),
    "cosine": ("cosine",),
    "rouge_l_short": ("short", "rouge_l"),
    "rouge_l_long": ("long", "rouge_l"),
    "bleu_short": ("short", "bleu"),
    "bleu_long": ("long", "bleu"),
}


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny ops on a busy 2-core machine run far faster on one thread (trainers and evaluation)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories():
    with gzip.open(EXAMPLE_CORPUS, "rt") as f:
        return [json.loads(line)["text"] for _, line in zip(range(80), f, strict=False)]


@pytest.fixture
def test_corpus(tmp_path, stories):
    """Stories 64..67 are not in the prepared data (its 64 stories: 48 train, 16 eval); 3 (train
    split) and 60 (eval split) are."""
    path = tmp_path / "test.jsonl"
    order = [3, 64, 65, 60, 66, 67]
    path.write_text("".join(json.dumps({"text": stories[i]}) + "\n" for i in order))
    return path


def _argv(prepared, out, test_corpus, *extra):
    return ["--data.prepared_dir", str(prepared), "--model.kernel_impl", "torch", "--loop.micro_batch_documents", "4",
            "--loop.eval_max_documents", "8", "--optim.warmup_steps", "0", "--test-data", str(test_corpus),
            "--test-docs", "3", "--eval-max-tokens", "4", "--out", str(out), *extra]  # fmt: skip


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _independent_validation_ce(run_dir, prepared, n_docs):
    """Token cross-entropy of the run's final model on the first n_docs validation documents,
    computed here from the shards (not by the trainer)."""
    from sonarllm.bundle import load_bundle
    from sonarllm.loss import SonarTargets, SonarTokenLoss
    from training.shards import ShardedDocuments

    bundle = load_bundle(run_dir / "final", kernel_impl="torch", encoder=False)
    docs = ShardedDocuments(prepared, "eval")
    loss_fn = SonarTokenLoss(bundle.pipeline.decoder, bundle.pipeline.tokenizer, kernel_impl="torch")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for d in range(n_docs):
            doc = docs[d]
            pred_SE = bundle.model(doc.embeddings.float()[None])[0]
            targets = SonarTargets.from_target_sequences(doc.tokens[1:], bundle.pipeline.tokenizer.eos_idx, duplicate_eos=True)
            total += float(loss_fn(pred_SE[:-1], targets, num_items=1))
            tokens += targets.num_tokens
    return total / tokens


@pytest.mark.usefixtures("one_thread")
def test_tiny_comparison_resumes_reports_and_reuses(tmp_path, prepared, test_corpus, stories, monkeypatch):
    out = tmp_path / "out"
    argv = _argv(prepared, out, test_corpus, "--objectives", "sonar,mse", "--seeds", "2", "--steps", "2",
                 "--eval-every", "1", "--lr", "sonar=3e-3", "--lr", "mse=1e-3")  # fmt: skip
    # A half-finished run, as an interrupted comparison leaves it: one of two steps, a checkpoint.
    plan = compare.make_plan(argv)
    out.mkdir()
    (out / compare.STAMP).write_text("an interrupted comparison\n")
    half = out / "runs" / "mse-lr0.001-seed1"
    cmd = compare.train_command(plan, compare.run_overrides(plan, "mse", 1e-3, 1) | {"run.stop_after": "1"})
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert (half / "checkpoints").is_dir() and not (half / "final").exists()

    assert compare.main(argv) == 0
    runs = json.loads((out / "per_seed.json").read_text())
    names = {r["run_dir"].rsplit("/", 1)[1]: r for r in runs}
    assert sorted(names) == ["mse-lr0.001-seed0", "mse-lr0.001-seed1", "sonar-lr0.003-seed0", "sonar-lr0.003-seed1"]
    assert {n: r["status"] for n, r in names.items()} == {
        "mse-lr0.001-seed0": "trained", "mse-lr0.001-seed1": "resumed",
        "sonar-lr0.003-seed0": "trained", "sonar-lr0.003-seed1": "trained"}  # fmt: skip
    assert "resumed from" in (half / "train.log").read_text()

    # Validation curves are the trainers' eval_token_ce; for the SONAR objective it is its loss.
    for name, run in names.items():
        records = [r for r in _records(out / "runs" / name / "metrics.jsonl") if "eval_token_ce" in r]
        assert run["validation_curve"] == [[r["step"], r["eval_token_ce"]] for r in records]
        assert [r["step"] for r in records] == [1, 2] and run["validation_token_ce"] == records[-1]["eval_token_ce"]
        if name.startswith("sonar"):
            assert all(r["eval_token_ce"] == r["eval_loss"] for r in records)
        else:
            assert all(r["eval_token_ce"] != r["eval_loss"] for r in records)
    mse_ce = _independent_validation_ce(out / "runs" / "mse-lr0.001-seed0", prepared, 8)
    assert names["mse-lr0.001-seed0"]["validation_token_ce"] == pytest.approx(mse_ce, rel=1e-5)

    # Test documents: the first 3 not in the prepared data; the 2 that are were dropped.
    assert [r["text"] for r in _records(out / "test.jsonl")] == [stories[64], stories[65], stories[66]]
    results = json.loads((out / "results.json").read_text())
    assert (results["test"]["documents"], results["test"]["dropped_in_prepared_data"]) == (3, 2)
    assert results["chosen_lr"] == {"sonar": 3e-3, "mse": 1e-3}
    assert results["trainer_config"]["loop"]["micro_batch_documents"] == 4 and "lr" not in results["trainer_config"]["optim"]

    # Mean ± sample std recomputed from each run's stored test evaluation.
    table = (out / "results.md").read_text()
    for objective in ("sonar", "mse"):
        evals = [json.loads((out / "runs" / f"{objective}-lr{lr}-seed{s}" / "test_eval.json").read_text())["results"]
                 for lr in ({"sonar": "0.003", "mse": "0.001"}[objective],) for s in (0, 1)]  # fmt: skip
        assert all(e["documents"] == 3 for e in evals)
        summary = results["summary"][objective]
        for key, path in METRICS.items():
            values = [e[path[0]] if len(path) == 1 else e[path[0]][path[1]] for e in evals]
            assert summary["metrics"][key]["mean"] == pytest.approx(statistics.mean(values))
            assert summary["metrics"][key]["std"] == pytest.approx(statistics.stdev(values))
        ce = summary["metrics"]["cross_entropy"]
        assert f"| {objective} | {summary['lr']:g} | 0,1 | {statistics.mean(e['cross_entropy'] for e in evals):.4f} ± " in table
        assert ce["n"] == 2
    assert (out / "compare.png").stat().st_size > 0

    # A second invocation trains and evaluates nothing.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    def refuse_eval(*args, **kwargs):
        raise AssertionError("a finished evaluation was run again")

    monkeypatch.setattr(compare_runs.subprocess, "Popen", refuse)
    monkeypatch.setattr("sonarllm.evaluate.evaluate", refuse_eval)
    assert compare.main(argv) == 0
    again = json.loads((out / "per_seed.json").read_text())
    assert {r["status"] for r in again} == {"reused"}
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]


@pytest.mark.usefixtures("one_thread")
def test_a_diverging_sweep_rate_loses_and_is_not_trained_again(tmp_path, prepared, test_corpus, monkeypatch):
    out = tmp_path / "out"
    argv = _argv(prepared, out, test_corpus, "--objectives", "sonar", "--seeds", "1", "--steps", "2",
                 "--eval-every", "1", "--lr", "sonar=1e-3,1e30")  # fmt: skip
    assert compare.main(argv) == 0
    runs = {r["lr"]: r for r in json.loads((out / "per_seed.json").read_text())}
    assert runs[1e30]["status"] == "diverged" and runs[1e30]["validation_token_ce"] == float("inf")
    assert "the training loss became nan" in runs[1e30]["error"]
    assert runs[1e-3]["role"] == "seed" and json.loads((out / "results.json").read_text())["chosen_lr"] == {"sonar": 1e-3}
    assert "| sonar | **" in (out / "results.md").read_text() and " | diverged |" in (out / "results.md").read_text()

    monkeypatch.setattr(compare_runs.subprocess, "Popen", lambda *a, **k: pytest.fail("a diverged run was trained again"))
    assert compare.main(argv) == 0
    assert {r["lr"]: r["status"] for r in json.loads((out / "per_seed.json").read_text())} == {1e-3: "reused", 1e30: "diverged"}


def test_every_rate_diverging_fails(tmp_path, prepared, test_corpus, capsys, monkeypatch):
    def diverge(cmd, log_path):
        log_path.write_text("train.py: error: the training loss became inf at step 2; stopped\n")
        return 1, False, None

    monkeypatch.setattr(compare_runs, "_child", diverge)
    argv = _argv(prepared, tmp_path / "out", test_corpus, "--objectives", "sonar", "--seeds", "1", "--steps", "2",
                 "--lr", "sonar=1e20,1e30")  # fmt: skip
    assert compare.main(argv) == 1
    err = capsys.readouterr().err
    assert "sonar: training diverged at every learning rate of --lr (1e+20,1e+30)" in err and err.count("\n") == 1


def _fake_results(seed: int) -> dict:
    """A sonarllm.evaluate result whose numbers are functions of the seed."""
    proto = {"rouge_l": 10.0 * (seed + 1), "bleu": 2.0 * seed, "cosine": 0.5}
    return {"documents": 1, "cross_entropy": 1.0 + seed, "cosine": 0.1 * seed, "short": proto, "long": dict(proto)}


def test_sweep_chooses_each_objectives_rate_on_validation_and_reports(tmp_path, test_corpus, monkeypatch):
    validation = {("sonar", 1e-3): 2.0, ("sonar", 2e-3): 1.5, ("mse", 1e-3): 1.8, ("mse", 2e-3): float("nan")}
    trained, evaluated = [], []

    def fake_train(plan, objective, lr, seed, role, label):
        trained.append((objective, lr, seed))
        ce = validation[(objective, lr)] if seed == 0 else 1.0 + seed
        return {"objective": objective, "lr": lr, "seed": seed, "role": role, "status": "trained",
                "run_dir": str(tmp_path / compare.run_name(objective, lr, seed)),
                "validation_token_ce": ce, "validation_curve": [[1, ce + 1], [2, ce]]}  # fmt: skip

    def fake_evaluate(plan, record, docs, info, cfg):
        evaluated.append((record["objective"], record["lr"], record["seed"]))
        return _fake_results(record["seed"])

    info = {"source": "x", "path": "x", "sha256": "0", "documents": 1, "dropped_in_prepared_data": 0}
    monkeypatch.setattr(compare, "train", fake_train)
    monkeypatch.setattr(compare, "evaluate_run", fake_evaluate)
    monkeypatch.setattr(compare, "held_out_documents", lambda *args, **kwargs: (["A story."], info))
    out = tmp_path / "out"
    argv = ["--objectives", "sonar,mse", "--seeds", "3", "--steps", "2", "--lr", "1e-3,2e-3",
            "--out", str(out), "--test-data", str(test_corpus)]  # fmt: skip
    assert compare.main(argv) == 0
    assert trained == [("sonar", 1e-3, 0), ("sonar", 2e-3, 0), ("sonar", 2e-3, 1), ("sonar", 2e-3, 2),
                       ("mse", 1e-3, 0), ("mse", 2e-3, 0), ("mse", 1e-3, 1), ("mse", 1e-3, 2)]  # NaN loses
    assert evaluated == [("sonar", 2e-3, 0), ("sonar", 2e-3, 1), ("sonar", 2e-3, 2),
                         ("mse", 1e-3, 0), ("mse", 1e-3, 1), ("mse", 1e-3, 2)]  # the test split: chosen rates only
    results = json.loads((out / "results.json").read_text())
    assert results["chosen_lr"] == {"sonar": 2e-3, "mse": 1e-3}
    assert results["sweep"]["sonar"] == {"0.001": 2.0, "0.002": 1.5}
    for objective in ("sonar", "mse"):
        m = results["summary"][objective]["metrics"]
        assert (m["cross_entropy"]["mean"], m["cross_entropy"]["std"]) == pytest.approx((2.0, 1.0))  # 1, 2, 3
        assert (m["rouge_l_long"]["mean"], m["rouge_l_long"]["std"]) == pytest.approx((20.0, 10.0))
        assert results["summary"][objective]["seeds"] == [0, 1, 2]
    roles = {(r["objective"], r["lr"], r["seed"]): r["role"] for r in json.loads((out / "per_seed.json").read_text())}
    assert roles[("sonar", 1e-3, 0)] == "sweep" and roles[("sonar", 2e-3, 0)] == "seed"
    table = (out / "results.md").read_text()
    assert "| sonar | 0.002 | 0,1,2 | 2.0000 ± 1.0000 | 0.1000 ± 0.1000 | 20.00 ± 10.00 |" in table
    assert "| objective | lr 0.001 | lr 0.002 |" in table
    assert "| sonar | 2.0000 | **1.5000** |" in table and "| mse | **1.8000** | nan |" in table
    assert "Note: sonar's chosen lr 0.002 is the largest of its grid; the best rate may be larger" in table
    assert "Note: mse's chosen lr 0.001 is the smallest of its grid; the best rate may be smaller" in table


def test_a_rate_inside_the_grid_gets_no_edge_note():
    from training.compare_report import grid_edge_note

    grid = {1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.7}
    assert grid_edge_note("sonar", grid, 2e-3) is None and grid_edge_note("sonar", {1e-3: 2.0}, 1e-3) is None
    assert "is the largest of its grid" in grid_edge_note("sonar", grid, 4e-3)


@pytest.mark.parametrize("extra, message", [
    (["--objectives", "sonar,lcm"], "argument --objectives: expected distinct objectives"),
    (["--objectives", "sonar,sonar"], "argument --objectives: expected distinct objectives"),
    (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got '0'"),
    (["--steps", "-3"], "argument --steps: expected an integer >= 1"),
    (["--lr", "1e-3,-1"], "argument --lr: expected learning rates > 0"),
    (["--lr", "mse=1e-3,1e-3"], "a learning rate is listed twice"),
    (["--lr", "1e-3,1.0000001e-3"], "--lr sonar=...: 0.001 and 0.0010000001 are the same to 6 significant digits"),
    (["--lr", "lcm=1e-3"], "OBJECTIVE one of sonar, mse"),
    (["--objectives", "sonar", "--lr", "mse=1e-3"], "'mse' is not in --objectives sonar"),
    (["--steps", "4", "--eval-every", "5"], "--eval-every 5 exceeds --steps 4"),
    (["--optim.lr", "1e-3"], "--optim.lr is set by compare for every run: use --lr"),
    (["--run.seed", "1"], "--run.seed is set by compare"),
    (["--run.stop_after", "1"], "every run trains to --steps"),
    (["--loop.max_stepz", "3"], "unknown configuration key 'loop.max_stepz'"),
    (["--optim.warmup_steps", "-1"], "optim.warmup_steps must be >= 0"),
    (["--test-data", "missing.jsonl"], "--test-data missing.jsonl not found"),
    (["--device", "tpu9"], "--device tpu9:"),
])  # fmt: skip
def test_bad_command_lines_exit_2_in_one_line(tmp_path, capsys, extra, message):
    code = compare.main(["--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("compare: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_out_holding_other_files_is_refused_untouched(tmp_path, test_corpus, capsys, monkeypatch):
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("trained into a foreign --out"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("my notes\n")
    assert compare.main(["--out", str(out), "--test-data", str(test_corpus)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"compare: error: --out {out} is not empty") and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["results.md"] and (out / "results.md").read_text() == "my notes\n"


def test_test_data_that_compare_would_write_is_refused_untouched(tmp_path, test_corpus, capsys, monkeypatch):
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("trained over --test-data"))
    out = tmp_path / "out"
    out.mkdir()
    (out / compare.STAMP).write_text("an earlier comparison\n")  # resumable: not refused for being non-empty
    mine = out / "test.jsonl"
    mine.write_bytes(test_corpus.read_bytes())
    assert compare.main(["--out", str(out), "--test-data", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"--test-data {mine} is a file compare writes in --out {out}" in err and err.count("\n") == 1
    assert mine.read_bytes() == test_corpus.read_bytes()


@pytest.mark.parametrize("content, field, message", [
    ('{"text": "A story."}\n', "nope", "--text-field nope: "),
    ("not json\n", "text", "not valid JSON"),
    ("", "text", "holds no documents"),
], ids=["wrong-field", "not-json", "empty"])  # fmt: skip
def test_bad_test_documents_fail_before_training(tmp_path, prepared, capsys, monkeypatch, content, field, message):
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("trained before checking the test documents"))
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text(content)
    assert compare.main(_argv(prepared, tmp_path / "out", corpus, "--text-field", field)) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare: error: --te") and message in err and err.count("\n") == 1
    if field == "text":
        assert err.startswith(f"compare: error: --test-data {corpus}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ready", [True, False], ids=["prepared", "prepared-by-the-first-run"])
def test_no_test_document_left_fails_before_the_long_training(tmp_path, prepared, stories, capsys, monkeypatch, ready):
    import shutil

    corpus = tmp_path / "seen.jsonl"
    corpus.write_text("".join(json.dumps({"text": stories[i]}) + "\n" for i in (3, 60)))  # both in the prepared data
    data = tmp_path / "prepared"
    if ready:
        shutil.copytree(prepared, data)
    trained = []

    def fake_train(plan, objective, lr, seed, role, label):
        trained.append(lr)
        shutil.copytree(prepared, data, dirs_exist_ok=True)  # what the trainer's data preparation leaves
        return {"objective": objective, "lr": lr, "seed": seed, "role": role, "status": "trained", "validation_token_ce": 1.0}

    monkeypatch.setattr(compare, "train", fake_train)
    argv = _argv(data, tmp_path / "out", corpus, "--data.source", str(corpus), "--lr", "1e-3,2e-3")
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--test-data {corpus}: no test document left: all 2 documents" in err and err.count("\n") == 1
    assert trained == ([] if ready else [1e-3])


def test_out_that_is_a_file_and_cuda_without_cuda_exit_2_in_one_line(tmp_path, test_corpus, capsys, monkeypatch):
    (tmp_path / "afile").write_text("mine\n")
    assert compare.main(["--out", str(tmp_path / "afile"), "--test-data", str(test_corpus)]) == 2
    assert capsys.readouterr().err == f"compare: error: --out {tmp_path / 'afile'} is not a directory\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compare.main(["--out", str(tmp_path / "out"), "--device", "cuda", "--test-data", str(test_corpus)]) == 2
    assert capsys.readouterr().err == "compare: error: --device cuda: CUDA is not available on this machine\n"


def test_other_data_needs_test_documents(tmp_path, capsys):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("A first sentence. A second one.\n")
    argv = ["--out", str(tmp_path / "out"), "--data.source", str(corpus), "--data.prepared_dir", str(tmp_path / "p")]
    assert compare.main(argv) == 2
    assert "--test-data is needed" in capsys.readouterr().err


def test_a_run_trained_otherwise_is_refused_not_overwritten(tmp_path, prepared, test_corpus, capsys):
    argv = _argv(prepared, tmp_path / "out", test_corpus, "--objectives", "sonar", "--seeds", "1", "--steps", "2", "--lr", "1e-3")
    plan = compare.make_plan(argv)
    recorded = compare.run_config(plan, "sonar", 1e-3, 0).to_dict()
    recorded["loop"]["max_steps"] = 5
    run_dir = tmp_path / "out" / "runs" / "sonar-lr0.001-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(recorded))
    (tmp_path / "out" / compare.STAMP).write_text("an earlier comparison\n")
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert "was trained with a different configuration (loop.max_steps 5 != 2)" in err and err.count("\n") == 1
    assert json.loads((run_dir / "config.json").read_text()) == recorded
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_stop_after_from_a_config_file_is_overridden(tmp_path, prepared, test_corpus):
    config = tmp_path / "stop.toml"
    config.write_text("[run]\nstop_after = 1\n")
    plan = compare.make_plan(["--config", str(config), *_argv(prepared, tmp_path / "out", test_corpus)])
    assert compare.run_config(plan, "sonar", 1e-3, 0).run.stop_after == 0


def test_a_run_that_stops_early_says_so(tmp_path, prepared, test_corpus, capsys, monkeypatch):
    monkeypatch.setattr(compare_runs, "_child", lambda cmd, log_path: (log_path.write_text("stopped\n"), (0, False, None))[1])
    argv = _argv(prepared, tmp_path / "out", test_corpus, "--objectives", "sonar", "--seeds", "1", "--steps", "2", "--lr", "1e-3")
    assert compare.main(argv) == 1
    err = capsys.readouterr().err
    assert "training sonar-lr0.001-seed0 stopped early without exporting final/" in err and err.count("\n") == 1
    assert "run the same command again to resume it" in err


def test_several_processes_train_through_torchrun(tmp_path, test_corpus):
    plan = compare.make_plan(["--nproc", "2", "--test-data", str(test_corpus), "--config", "training/configs/example.toml"])
    cmd = compare.train_command(plan, compare.run_overrides(plan, "mse", 2e-3, 1))
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6].endswith("training/train.py") and cmd[7:9] == ["--config", "training/configs/example.toml"]
    pairs = dict(zip(cmd[9::2], cmd[10::2], strict=True))
    assert (pairs["--model.objective"], pairs["--run.seed"], float(pairs["--optim.lr"])) == ("mse", "1", 2e-3)


def test_sonarllm_compare_is_the_same_command(capsys):
    from sonarllm.cli import main

    assert main(["compare", "--seeds", "0"]) == 2
    assert "compare: error: argument --seeds" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_under_torchrun_the_trainers_refusal_and_divergence_reach_compare(tmp_path, prepared, test_corpus, capsys):
    """--nproc 2: torchrun exits 1 and ends the log with its own lines; compare reports the
    trainer's error and status: a configuration refusal exits 2, a diverged rate is recorded as
    diverged (here every rate diverges, so compare fails saying so)."""
    argv = _argv(prepared, tmp_path / "refused", test_corpus, "--nproc", "2", "--objectives", "sonar", "--seeds", "1",
                 "--steps", "2", "--lr", "1e-3", "--loop.micro_batch_documents", str(10**9))  # fmt: skip
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training sonar-lr0.001-seed0 failed (exit status 2): train.py: error: the " \
        f"training split of data.prepared_dir {prepared} has 48 documents" in err  # fmt: skip

    argv = _argv(prepared, tmp_path / "diverged", test_corpus, "--nproc", "2", "--objectives", "sonar", "--seeds", "1",
                 "--steps", "2", "--eval-every", "1", "--lr", "1e30", "--loop.grad_accum_steps", "1")  # fmt: skip
    assert compare.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sonar: training diverged at every learning rate of --lr (1e+30)" in err
    assert "the training loss became nan" in (tmp_path / "diverged" / "runs" / "sonar-lr1e+30-seed0" / "diverged").read_text()


@pytest.mark.usefixtures("one_thread")
def test_a_killed_compare_takes_its_trainer_with_it(tmp_path, prepared, test_corpus):
    """SIGKILL gives compare no chance to stop its trainer: the kernel sends the trainer SIGTERM,
    which stops it at the end of its step with a checkpoint."""
    import signal
    import time

    import psutil

    from tests.training.test_train import REPO, _env

    out = tmp_path / "out"
    argv = _argv(prepared, out, test_corpus, "--objectives", "sonar", "--seeds", "1", "--steps", "100000", "--lr", "1e-3")
    proc = subprocess.Popen([sys.executable, "-m", "training.compare", *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    run_dir, trainers = out / "runs" / "sonar-lr0.001-seed0", []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            log = run_dir / "train.log"
            if log.is_file() and "first step done" in log.read_text():
                trainers = psutil.Process(proc.pid).children(recursive=True)
                break
            time.sleep(0.2)
        assert trainers, "the trainer did not reach its first step"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(trainers, timeout=120)
        assert not alive, "the trainer went on after compare was killed"
    finally:
        for p in trainers:
            if p.is_running():
                p.kill()
        proc.kill()
    assert list((run_dir / "checkpoints").glob("step-*"))  # it stopped with a checkpoint
