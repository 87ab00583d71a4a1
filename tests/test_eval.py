"""Tests of the evaluation harness (lessismore.eval): grading, metrics, GPQA shuffle, prompts, resume,
and one end-to-end run on the real default model."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lessismore.config import FULL, SparseConfig
from lessismore.eval.generation import HFGenerator, SamplingParams
from lessismore.eval.grading import boxed_answers, grade_response, last_boxed
from lessismore.eval.metrics import mean_and_stderr, pass_at_k, summarize
from lessismore.eval.prompts import MATH_INSTRUCTION, build_prompt
from lessismore.eval.report import compute_rows
from lessismore.eval.runner import EvalSettings, evaluate, read_records, sample_seed
from lessismore.eval.tasks import load_task, parse_gpqa_options


@pytest.fixture(scope="module")
def one_thread():
    # The test machine is small and shared: one intra-op thread avoids oversubscription stalls.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def generator(one_thread, default_model):
    return HFGenerator(*default_model)


# --- grading ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "response, reference, correct",
    [
        (r"so \boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True),
        (r"\boxed{0.5}", r"\frac12", True),
        (r"\boxed{3.50}", "3.5", True),
        (r"\boxed{90^\circ}", "90", True),
        (r"\boxed{90^{\circ}}", r"90^\circ", True),
        (r"\boxed{(1, 2]}", "(1,2]", True),
        (r"\boxed{[1, 2]}", "(1,2]", False),  # closed vs half-open interval
        (r"\boxed{x = 5}", "5", True),
        (r"\boxed{5 \text{ cm}}", "5", True),
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
        (r"\boxed{\text{(C)}}", r"\text{(C)}", True),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),  # nested braces
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"first \boxed{204}, on reflection \boxed{205}", "205", True),  # the last box counts
        (r"first \boxed{205}, on reflection \boxed{204}", "205", False),
        (r"\boxed{205}", "204", False),
        (r"\boxed{1,000}", "1000", True),
    ],
)
def test_grader_tricky_cases(response, reference, correct):
    g = grade_response(response, reference)
    assert g.correct is correct, g
    assert g.reason == ("match" if correct else "mismatch")


def test_boxed_extraction_nested_and_unparseable():
    assert last_boxed(r"\boxed{\frac{a^{2}}{\sqrt{b_{1}}}} end") == r"\frac{a^{2}}{\sqrt{b_{1}}}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces are not structure
    assert last_boxed(r"\boxed 7 done") == "7"
    assert boxed_answers(r"\boxed{1} then \boxed{2") == (["1"], True)  # the last complete box counts
    g = grade_response("I think the answer is 204.", "204")
    assert not g.correct and g.extracted is None and g.reason.startswith("unparseable: no \\boxed")
    g = grade_response(r"\boxed{", "204")
    assert not g.correct and "unclosed" in g.reason
    assert grade_response(r"\boxed{}", "204").reason.startswith("unparseable")


def test_grader_letters():
    assert grade_response(r"... so \boxed{B}", "B").correct
    assert grade_response(r"\boxed{\text{(B)}}", "B", multiple_choice=True).correct
    assert grade_response(r"\boxed{B. the second option}", "B", multiple_choice=True).correct
    assert not grade_response(r"\boxed{C}", "B", multiple_choice=True).correct
    g = grade_response(r"\boxed{B or C}", "B", multiple_choice=True)
    assert not g.correct and g.reason.startswith("unparseable")


def test_grader_off_main_thread():
    # math-verify's signal.alarm timeouts only work on the main thread; the grader turns them off there.
    with ThreadPoolExecutor(1) as pool:
        g = pool.submit(grade_response, r"\boxed{\dfrac{6}{8}}", "0.75").result()
        assert pool.submit(threading.current_thread).result() is not threading.main_thread()
    assert g.correct


# --- metrics ----------------------------------------------------------------------------------------

def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(16, 1, 8) == pytest.approx(0.5)  # 1 - C(15,8)/C(16,8) = 1 - 8/16
    assert pass_at_k(4, 3, 1) == pytest.approx(0.75)  # pass@1 = c/n
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong samples
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


def test_summarize_stderr_on_small_table():
    outcomes = {"a": [1, 0], "b": [1, 1], "c": [0, 0]}  # per-problem means 0.5, 1, 0
    recs = [
        {"problem_id": p, "correct": bool(c), "gen_tokens": 10 * (i + 1), "truncated": i == 1, "decode_seconds": 1.0}
        for p, cs in outcomes.items()
        for i, c in enumerate(cs)
    ]
    row = summarize(recs)
    assert row["pass@1"] == pytest.approx(0.5)
    assert row["stderr"] == pytest.approx(0.5 / 3**0.5)  # sd of (0.5, 1, 0) is 0.5
    assert row["pass@2"] == pytest.approx((1 + 1 + 0) / 3)
    assert "pass@4" not in row  # n = 2 < 4
    assert row["mean_gen_len"] == 15 and row["median_gen_len"] == 15
    assert row["truncated_frac"] == pytest.approx(0.5)
    assert row["decode_tokens_per_s"] == pytest.approx((9 + 19) * 3 / 6)
    assert (row["n_problems"], row["n_samples"]) == (3, 6)
    assert mean_and_stderr([0.3]) == (0.3, None)


# --- tasks and prompts --------------------------------------------------------------------------------

GPQA_SUFFIX = "\n\nPlease reason step-by-step and put your choice letter without any other text with \\boxed{} in the end."


def _gpqa_file(tmp_path):
    rows = []
    for i in range(1, 9):
        options = [f"right answer {i}", f"wrong one {i}", f"wrong two {i}", f"wrong three {i}"]
        block = "\n".join(f"{'ABCD'[j]}. {o}" for j, o in enumerate(options))
        rows.append({"id": i, "question": f"Question {i}: what holds?\n\n{block}{GPQA_SUFFIX}", "answer": "A"})
    path = tmp_path / "gpqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gpqa_shuffle_deterministic_and_remapped(tmp_path):
    path = _gpqa_file(tmp_path)
    first, second = load_task("gpqa", path), load_task("gpqa", path)
    assert first == second  # same order every time
    letters = set()
    for p in first:
        i = int(p.id)
        assert p.options[("ABCD").index(p.answer)] == f"right answer {i}"  # remapped to the right text
        assert sorted(p.options) == sorted([f"right answer {i}", f"wrong one {i}", f"wrong two {i}", f"wrong three {i}"])
        assert p.question.startswith(f"Question {i}: what holds?\n\nA. ")
        assert "Please reason step-by-step" not in p.question  # the file's suffix is replaced by ours, once
        assert p.user_message.count("\\boxed{}") == 1
        letters.add(p.answer)
    assert len(letters) > 1  # the correct option no longer always comes first
    stem, options = parse_gpqa_options("Stem with\nA. line inside\n\nA. one\nB. two\nwrapped\nC. three\nD. four")
    assert stem == "Stem with\nA. line inside" and options == ["one", "two\nwrapped", "three", "four"]


def test_gpqa_needs_data_and_valid_answers(tmp_path):
    with pytest.raises(ValueError, match=r"^data: task gpqa needs --data"):
        load_task("gpqa")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "question": "Q\n\nA. a\nB. b\nC. c\nD. d", "answer": "E"}) + "\n")
    with pytest.raises(ValueError, match=r"^data: .*answer must be one of A-D"):
        load_task("gpqa", bad)


def test_shipped_tasks():
    assert [len(load_task(t)) for t in ("aime24", "aime25", "math500")] == [30, 30, 500]
    p = load_task("aime24", limit=1)[0]
    assert (p.id, p.answer) == ("60", "204")


def test_prompt_has_a_real_backslash(generator):
    assert "\\boxed{}" in MATH_INSTRUCTION and "\x08" not in MATH_INSTRUCTION
    assert MATH_INSTRUCTION == "Please reason step by step, and put your final answer within " + chr(92) + "boxed{}."
    p = load_task("aime24", limit=1)[0]
    text = build_prompt(generator.tokenizer, p.user_message)
    assert p.question + "\n" + MATH_INSTRUCTION in text
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert "\x08" not in text


def test_settings_errors_name_the_field(tmp_path):
    def settings(**kw):
        base = dict(task="aime24", out=str(tmp_path / "o"), methods=["lessismore"], budgets=[64])
        return EvalSettings(**{**base, **kw}).validate()

    for kw, field in [
        ({"methods": ["nope"]}, "methods"), ({"budgets": [0]}, "budgets"),
        ({"budgets": [4]}, "sink_tokens"), ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
        ({"n": 0}, "n"), ({"batch_size": 0}, "batch_size"), ({"task": "gpqa"}, "data"), ({"task": "x"}, "task"),
        ({"page_size": 64}, "page_size"),  # lessismore has no pages
        ({"methods": ["full"], "budgets": [], "recent_ratio": 0.5}, "recent_ratio"),
        ({"methods": ["full"], "budgets": [64]}, "budgets"),
        ({"methods": ["quest"], "full_layers": (-1,)}, "full_layers"),
        ({"methods": ["quest"], "page_size": 0}, "page_size"),
    ]:
        with pytest.raises(ValueError, match=rf"^{field}: "):
            settings(**kw)
    assert settings(methods=["full"], budgets=[]).grid() == [("full", None)]
    assert settings(methods=["full", "lessismore"], budgets=[64, 128]).grid() == [
        ("full", None), ("lessismore", 64), ("lessismore", 128)
    ]
    assert settings(budgets=[]).grid() == [("lessismore", 2048)]  # no budget given: the method's
    assert settings(task="math500").n == 8 and settings().n == 16
    # Each cell's config takes the options its method uses; full attention is the one FULL config.
    s = settings(methods=["quest", "lessismore", "full"], page_size=64, full_layers=(), recent_ratio=0.5)
    assert s.sparse_config("full", None) == FULL
    assert s.sparse_config("quest", 64) == SparseConfig(method="quest", budget=64, page_size=64, full_layers=())
    assert s.sparse_config("lessismore", 64) == SparseConfig(method="lessismore", budget=64, recent_ratio=0.5, full_layers=())
    fixed = s.fixed()
    assert (fixed["page_size"], fixed["full_layers"], fixed["recent_ratio"], fixed["sink_tokens"]) == (64, [], 0.5, 4)
    # Unset options bind as the methods' defaults, whichever methods run.
    assert {k: settings(methods=["full"], budgets=[]).fixed()[k] for k in ("page_size", "full_layers", "recent_ratio")} == {
        "page_size": 16, "full_layers": [0, 1], "recent_ratio": 0.25}


# --- generation, resume, end to end -----------------------------------------------------------------

def test_sampling_seeded_per_sample(generator):
    prompt = build_prompt(generator.tokenizer, "Name a colour.")
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=12)
    alone = generator.generate([prompt], [11], params, FULL)[0]
    batched = generator.generate([prompt, prompt], [22, 11], params, FULL)
    assert batched[1].text == alone.text  # a sample's draws do not depend on its batch mates
    assert 1 <= alone.num_tokens <= 12 and alone.decode_seconds >= 0


class _Killed(Exception):
    pass


class _Counting:
    """Passes calls through to the real generator, counting samples; raises after ``kill_after`` calls."""

    def __init__(self, inner, kill_after=None):
        self.inner, self.kill_after, self.calls, self.samples = inner, kill_after, 0, 0
        self.tokenizer = inner.tokenizer

    def generate(self, prompts, seeds, params, sparse):
        if self.kill_after is not None and self.calls >= self.kill_after:
            raise _Killed
        self.calls += 1
        self.samples += len(prompts)
        return self.inner.generate(prompts, seeds, params, sparse)


def _table(out):
    rows = compute_rows(read_records(out))
    for r in rows:
        r.pop("decode_tokens_per_s")
    return rows


def test_resume_after_kill_matches_uninterrupted_run(generator, tmp_path):
    def settings(out):
        return EvalSettings(
            task="math500", out=str(out), methods=["lessismore", "full"], budgets=[32], n=2, limit=2,
            max_new_tokens=6, temperature=0.0, batch_size=1,
        )

    whole = _Counting(generator)
    evaluate(settings(tmp_path / "whole"), whole, progress=False)
    assert whole.samples == 2 * 2 * 2

    killed = _Counting(generator, kill_after=3)
    with pytest.raises(_Killed):
        evaluate(settings(tmp_path / "cut"), killed, progress=False)
    path = tmp_path / "cut" / "samples.rank0.jsonl"
    with open(path, "a") as f:  # the kill also cut a line short mid-write
        f.write('{"task": "math500", "problem_id": "test/alg')
    assert len(read_records(tmp_path / "cut")) == 3

    resumed = _Counting(generator)
    result = evaluate(settings(tmp_path / "cut"), resumed, progress=False)
    assert resumed.samples == 8 - 3 and result == {"written": 5, "skipped": 3, "file": str(path)}
    assert _table(tmp_path / "cut") == _table(tmp_path / "whole")
    again = _Counting(generator)
    assert evaluate(settings(tmp_path / "cut"), again, progress=False)["written"] == 0 and again.calls == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(x) for x in lines)  # the cut line was dropped

    with pytest.raises(ValueError, match=r"^out: .*temperature"):
        evaluate(EvalSettings(**{**vars(settings(tmp_path / "cut")), "temperature": 0.6}), resumed, progress=False)
    # The sparse options are bound as resolved: the default given explicitly is the same run, another
    # value of any of them is refused.
    same = EvalSettings(**{**vars(settings(tmp_path / "cut")), "sink_tokens": 4, "full_layers": (0, 1)})
    assert evaluate(same, resumed, progress=False)["written"] == 0
    for key, value in [("sink_tokens", 8), ("full_layers", ()), ("selection_layers", (2, 5)), ("recent_ratio", 0.5)]:
        with pytest.raises(ValueError, match=rf"^out: .*{key}="):
            evaluate(EvalSettings(**{**vars(settings(tmp_path / "cut")), key: value}), resumed, progress=False)
    with pytest.raises(ValueError, match=r"^out: .*page_size="):  # a quest cell added with other pages
        evaluate(EvalSettings(**{**vars(settings(tmp_path / "cut")), "methods": ["quest"], "page_size": 8}),
                 resumed, progress=False)


def test_end_to_end_default_model(one_thread, tmp_path, capsys, monkeypatch):
    from lessismore.cli import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    argv = ["eval", "--task", "aime24", "--limit", "2", "--n", "2", "--max-new-tokens", "32",
            "--methods", "lessismore,full", "--budgets", "64", "--batch-size", "4", "--out", str(out)]
    assert main(argv) == 0
    records = read_records(out)
    assert len(records) == 2 * 2 * 2
    r = records[0]
    assert r["temperature"] == 0.6 and r["seed"] == sample_seed(0, r["problem_id"], r["sample"])
    assert all(x["grade_reason"] and (x["extracted"] or not x["correct"]) for x in records)
    assert any(x["kv_read_fraction"] < 1 for x in records if x["method"] == "lessismore")

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| LessIsMore |" in text and "| Full attention |" in text and "K=64" in text
    assert (out / "report.md").exists() and (out / "accuracy_vs_budget.png").stat().st_size > 1000

    assert main(["report", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(x["method"], x["budget"]) for x in rows] == [("lessismore", 64), ("full", None)]
    for x in rows:
        assert {"method", "budget", "pass@1", "stderr", "mean_gen_len", "truncated_frac", "n_problems", "n_samples"} <= set(x)
        assert (x["n_problems"], x["n_samples"]) == (2, 4)

    assert main(argv[:-2] + ["--methods", "nope", "--out", str(out)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "error: dir: no such folder" in capsys.readouterr().err


def test_sharded_ranks_write_own_files_and_report_merges(generator, tmp_path, monkeypatch):
    settings = dict(task="aime25", out=str(tmp_path), methods=["full"], n=1, limit=3, max_new_tokens=2,
                    temperature=0.0, batch_size=4)
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        evaluate(EvalSettings(**settings), generator, progress=False)
    by_rank = {p.name: [json.loads(x)["problem_id"] for x in p.read_text().splitlines()] for p in tmp_path.glob("samples*")}
    assert by_rank == {"samples.rank0.jsonl": ["0", "2"], "samples.rank1.jsonl": ["1"]}
    (row,) = compute_rows(read_records(tmp_path))
    assert (row["method"], row["budget"], row["n_problems"], row["truncated_frac"]) == ("full", None, 3, 1.0)


def test_engine_generator_matches_hf_generator(generator):
    """The fast engine behind the evaluation interface decodes what the HF path decodes (greedy)."""
    from lessismore import Engine
    from lessismore.eval.generation import EngineGenerator

    fast = EngineGenerator(Engine("default", cfg=FULL, device="cpu", max_batch=2, max_len=512))
    prompts = [build_prompt(generator.tokenizer, "What is 7 * 8?"),
               build_prompt(generator.tokenizer, "Name three prime numbers larger than 100.")]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    for sparse in (FULL, SparseConfig(method="lessismore", budget=32)):
        expected = generator.generate(prompts, [1, 2], params, sparse)
        got = fast.generate(prompts, [1, 2], params, sparse)
        assert [c.text for c in got] == [c.text for c in expected]
        assert [c.num_tokens for c in got] == [c.num_tokens for c in expected]
