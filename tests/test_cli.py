"""The command line: one set of sparse-attention options for generate / eval / analyze, the checks made
before a model loads, light --help, and eval's progress bar."""
import json
import subprocess
import sys

import pytest

from lessismore import methods
from lessismore.cli import METHOD_NAMES, SPARSE_OPTIONS, build_parser, main, sparse_configs
from lessismore.config import FULL, SETTINGS, SparseConfig


def parse(*argv):
    return build_parser(only=argv[0]).parse_args(list(argv))


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lessismore {command}: error: "), err
    return err


# --- the shared sparse-attention options ----------------------------------------------------------

ALL_OPTIONS = ["--budget", "96", "--recent-ratio", "0.5", "--sink-tokens", "8", "--selection-layers", "3,9",
               "--full-layers", "0", "--page-size", "32"]


def test_every_field_has_an_option():
    assert set(SPARSE_OPTIONS) == set(SETTINGS)
    for args in (parse("generate", "--prompt", "x", *ALL_OPTIONS), parse("analyze", "--out", "o", *ALL_OPTIONS)):
        assert all(getattr(args, f) is not None for f in SETTINGS)
    args = parse("eval", "--task", "aime24", "--methods", "quest", "--out", "o", "--budgets", "64,128", *ALL_OPTIONS[2:])
    assert args.budgets == (64, 128) and not hasattr(args, "budget")


def test_every_option_reaches_the_config():
    args = parse("generate", "--prompt", "x", *ALL_OPTIONS)
    lim, quest, full = sparse_configs(args, ["lessismore", "quest", "full"])
    assert lim == SparseConfig(method="lessismore", budget=96, recent_ratio=0.5, sink_tokens=8,
                               selection_layers=(3, 9), full_layers=(0,))
    assert quest == SparseConfig(method="quest", budget=96, page_size=32, full_layers=(0,))
    assert full == FULL
    # Nothing given: every method's own defaults.
    args = parse("generate", "--prompt", "x")
    assert all(getattr(args, f) is None for f in SETTINGS)
    for name in methods.available():
        (cfg,) = sparse_configs(args, [name])
        assert cfg == SparseConfig(method=name)


def test_eval_sweeps_budgets():
    args = parse("eval", "--task", "aime24", "--methods", "quest,full,tidaldecode", "--budgets", "64,128",
                 "--page-size", "64", "--out", "o")
    configs = sparse_configs(args, args.methods)
    assert [(c.method, c.budget) for c in configs] == [("quest", 64), ("quest", 128), ("full", None),
                                                       ("tidaldecode", 64), ("tidaldecode", 128)]
    assert configs[0].page_size == 64
    args = parse("eval", "--task", "aime24", "--methods", "lessismore", "--out", "o")
    assert [c.budget for c in sparse_configs(args, args.methods)] == [2048]  # no --budgets: the method's


@pytest.mark.parametrize("value", ["", "none"])
def test_empty_full_layers(value):
    args = parse("generate", "--prompt", "x", "--method", "quest", "--full-layers", value)
    (cfg,) = sparse_configs(args, ["quest"])
    assert cfg.full_layers == ()
    (default,) = sparse_configs(parse("generate", "--prompt", "x"), ["quest"])
    assert default.full_layers == (0, 1)


@pytest.mark.parametrize("argv, methods_, message", [
    (["--page-size", "7"], ["tidaldecode"], "--page-size: not used by tidaldecode"),
    (["--recent-ratio", "0.5"], ["quest", "streaming"], "--recent-ratio: not used by quest, streaming"),
    (["--budget", "64"], ["full"], "--budget: not used by full"),
    (["--full-layers", ""], ["full"], "--full-layers: not used by full"),
])
def test_unused_option_is_refused(argv, methods_, message):
    args = parse("generate", "--prompt", "x", *argv)
    with pytest.raises(ValueError, match=f"^{message}"):
        sparse_configs(args, methods_)


def test_unused_and_bad_options_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["eval", "--task", "aime24", "--methods", "tidaldecode", "--page-size", "7", "--out", str(out)]) == 2
    assert "error: --page-size: not used by tidaldecode" in one_line_error(capsys, "eval")
    assert main(["eval", "--task", "aime24", "--methods", "full", "--budgets", "64", "--out", str(out)]) == 2
    assert "error: --budgets: not used by full" in one_line_error(capsys, "eval")
    assert main(["generate", "--prompt", "x", "--page-size", "7"]) == 2
    assert "error: --page-size: not used by lessismore" in one_line_error(capsys, "generate")
    assert main(["analyze", "--methods", "quest", "--sink-tokens", "2", "--no-extras", "--out", str(out)]) == 2
    assert "error: --sink-tokens: not used by quest" in one_line_error(capsys, "analyze")
    assert main(["generate", "--prompt", "x", "--budget", "4"]) == 2  # sink tokens must fit in the budget
    assert "error: --sink-tokens: must be an integer in [0, budget)" in one_line_error(capsys, "generate")
    assert main(["generate", "--prompt", "x", "--method", "nope"]) == 2
    assert "error: --method: unknown method 'nope'" in one_line_error(capsys, "generate")
    assert not out.exists()


def test_paper_quest_setting_parses():
    from lessismore.eval.cli import settings_from_args

    args = parse("eval", "--task", "aime24", "--methods", "quest,full", "--budgets", "64", "--page-size", "64",
                 "--full-layers", "", "--out", "o")
    settings = settings_from_args(args)
    assert settings.grid() == [("quest", 64), ("full", None)]
    assert settings.sparse_config("quest", 64) == SparseConfig(method="quest", budget=64, page_size=64, full_layers=())
    assert settings.sparse_config("full", None) == FULL
    fixed = settings.fixed()
    assert (fixed["page_size"], fixed["full_layers"]) == (64, [])


def test_analyze_options():
    from lessismore.analysis.cli import options_from_args

    args = parse("analyze", "--methods", "quest,full", "--budget", "64", "--page-size", "64", "--full-layers", "",
                 "--out", "o")
    options = options_from_args(args)
    assert options.configs == (SparseConfig(method="quest", budget=64, page_size=64, full_layers=()), FULL)
    assert options.base == SparseConfig(method="lessismore", budget=64, full_layers=())  # the counterfactuals'
    # The counterfactuals (on by default) use LessIsMore's config, so its options count as used.
    args = parse("analyze", "--methods", "quest", "--recent-ratio", "0.5", "--out", "o")
    assert options_from_args(args).base.recent_ratio == 0.5
    # The budget is the analysis's own K, used with full attention alone too.
    args = parse("analyze", "--methods", "full", "--no-extras", "--budget", "64", "--out", "o")
    options = options_from_args(args)
    assert options.configs == (FULL,) and options.base.budget == 64


def test_help_texts_match_the_code():
    """The defaults the help shows (written out so that parsing imports no method) are the methods'."""
    from lessismore.analysis import cli as analysis_cli
    from lessismore.analysis import runner

    assert sorted(METHOD_NAMES) == methods.available()
    assert analysis_cli.DEFAULT_METHODS == runner.DEFAULT_METHODS
    assert analysis_cli.DEFAULT_RECENT_RATIOS == runner.DEFAULT_RECENT_RATIOS
    for field, (_, _, _, shown) in SPARSE_OPTIONS.items():
        defaults = {m.settings[field] for m in map(methods.get, methods.available()) if field in m.settings}
        assert len(defaults) == 1, (field, defaults)
        (value,) = defaults
        expected = "per model" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert shown == expected, field


# --- checks before the model loads ------------------------------------------------------------------

def run_light(argv, tmp_path):
    """main(argv) in a fresh interpreter: (exit code, stderr, whether transformers got imported, so
    whether a model could have been loaded)."""
    code = ("import sys; from lessismore.cli import main; rc = main(sys.argv[1:]); "
            "print('transformers' in sys.modules, file=sys.stdout); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    return p.returncode, p.stderr.strip(), p.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("command", ["generate", "eval", "analyze"])
def test_cuda_without_cuda(command, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o"
    argv = {"generate": ["generate", "--prompt", "hi"],
            "eval": ["eval", "--task", "aime24", "--methods", "full", "--out", str(out)],
            "analyze": ["analyze", "--out", str(out)]}[command]
    assert main([*argv, "--device", "cuda"]) == 2
    err = one_line_error(capsys, command)
    assert err.endswith("error: --device: cuda requested but no CUDA device is available")
    assert main([*argv, "--device", "gpu"]) == 2
    assert "error: --device: expected cpu, cuda, cuda:N or mps, got 'gpu'" in one_line_error(capsys, command)
    assert not out.exists()


def test_empty_prompt(tmp_path, capsys):
    for prompt in ("", "  \n"):
        assert main(["generate", "--prompt", prompt]) == 2
        assert one_line_error(capsys, "generate").endswith("--prompt: the prompt is empty")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["generate", "--prompt-file", str(empty)]) == 2
    assert one_line_error(capsys, "generate").endswith(f"--prompt-file: {empty} is empty")
    assert main(["generate", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "--prompt-file: cannot read" in one_line_error(capsys, "generate")


def test_unwritable_json_is_refused_before_loading(tmp_path):
    for target, message in [(tmp_path / "no" / "such" / "out.json", "--json: cannot write"),
                            (tmp_path, "is a folder")]:
        rc, err, loaded = run_light(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--json", str(target)], tmp_path)
        assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
        assert not loaded  # refused before any model (or transformers) loaded
    writable = tmp_path / "fine.json"
    from lessismore.cli import check_writable_file

    check_writable_file("--json", str(writable))
    assert not writable.exists()  # the check leaves no file behind


def test_model_folder_without_tokenizer(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "o"
    for argv in (["generate", "--prompt", "hi"], ["generate", "--prompt", "hi", "--engine", "fast"],
                 ["eval", "--task", "aime24", "--methods", "full", "--out", str(out)], ["analyze", "--out", str(out)]):
        assert main([*argv, "--model", str(folder)]) == 2
        err = one_line_error(capsys, argv[0])
        assert f"--model: {folder} has no tokenizer (looked for tokenizer.json" in err, err
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "--model: expected 'default', a model folder or a .gguf file" in one_line_error(capsys, "generate")
    (folder / "config.json").unlink()
    assert main(["generate", "--prompt", "hi", "--model", str(folder)]) == 2
    assert "has no config.json" in one_line_error(capsys, "generate")
    assert not out.exists()


# --- --help -----------------------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "lessismore.integrations.hf", "lessismore.engine", "lessismore.methods")


def _help(argv):
    code = ("import sys, time; t = time.perf_counter(); from lessismore.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], round(time.perf_counter() - t, 2))")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text, _, tail = p.stdout.rpartition("HEAVY ")
    return " ".join(text.split()), tail  # help lines wrap at the terminal width


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["generate", "--help"], ["report", "--help"]])
def test_help_is_light_and_shows_defaults(argv):
    text, tail = _help(argv)
    assert tail.startswith("[]"), f"--help imported {tail}"
    assert "usage: lessismore" in text
    if argv[0] == "eval":
        assert "(default: 0.6)" in text and "(default: the method's, 16)" in text and "--full-layers" in text
    if argv[0] == "generate":
        assert "(default: 256)" in text and "(default: the method's, 2048)" in text


def test_analyze_help_is_light():
    _, tail = _help(["analyze", "--help"])
    assert tail.startswith("[]"), f"--help imported {tail}"


# --- runs on the real default model -------------------------------------------------------------------

def test_eval_progress_and_the_paper_quest_setting(tmp_path, capsys, monkeypatch):
    """The paper's Quest setting runs; eval shows a progress bar over samples wherever stderr goes (not
    only on a terminal); resuming with other sparse options is refused."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "ev"
    argv = ["eval", "--task", "aime24", "--limit", "1", "--n", "1", "--max-new-tokens", "3", "--temperature", "0",
            "--methods", "quest,full", "--budgets", "64", "--page-size", "64", "--full-layers", "", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "eval aime24" in err and "2/2" in err and "sample" in err, err
    assert "batch at token" in err  # the postfix moves during a batch
    fixed = json.loads((out / "run.json").read_text())["fixed"]
    assert (fixed["page_size"], fixed["full_layers"]) == (64, [])
    records = [json.loads(x) for x in (out / "samples.rank0.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["budget"]) for r in records) == [("full", None), ("quest", 64)]

    assert main(argv + ["--no-progress"]) == 0  # resumed: nothing left to do
    assert "eval aime24" not in capsys.readouterr().err
    assert main([*argv[:-6], "--page-size", "32", "--full-layers", "", "--out", str(out)]) == 2
    assert "page_size=64" in one_line_error(capsys, "eval")


def test_generate_json_has_the_config(tmp_path, capsys):
    target = tmp_path / "g.json"
    argv = ["generate", "--prompt", "What is 2 + 3?", "--method", "quest", "--budget", "64", "--page-size", "64",
            "--full-layers", "", "--max-new-tokens", "2", "--quiet", "--json", str(target)]
    assert main(argv) == 0
    result = json.loads(target.read_text())
    assert {k: result[k] for k in ("method", "budget", "page_size", "full_layers", "recent_ratio")} == {
        "method": "quest", "budget": 64, "page_size": 64, "full_layers": [], "recent_ratio": None}
    assert result["generated_tokens"] == 2


def test_fast_engine_reports_the_kv_read_fraction_of_the_hf_path(tmp_path):
    """generate --engine fast --json reports the executor's KV-read fraction, the same number the HF
    path reports for the same greedy tokens."""
    fractions = {}
    for engine in ("hf", "fast"):
        target = tmp_path / f"{engine}.json"
        argv = ["generate", "--prompt", "Count from one to fifty:", "--method", "lessismore", "--budget", "16",
                "--sink-tokens", "2", "--max-new-tokens", "12", "--quiet", "--engine", engine, "--json", str(target)]
        assert main(argv) == 0
        fractions[engine] = json.loads(target.read_text())["kv_read_fraction"]
    assert fractions["fast"] is not None and fractions["fast"] < 1.0
    assert fractions["fast"] == pytest.approx(fractions["hf"])
