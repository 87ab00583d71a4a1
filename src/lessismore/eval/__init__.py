"""Evaluation on reasoning benchmarks (AIME-24/25, MATH500, GPQA-Diamond): accuracy, generation length
and decode speed per method and budget. See docs/evaluation.md."""
from lessismore.eval.generation import Completion, Generator, HFGenerator, SamplingParams
from lessismore.eval.grading import Grade, grade_response, last_boxed
from lessismore.eval.metrics import pass_at_k, summarize
from lessismore.eval.prompts import GPQA_INSTRUCTION, MATH_INSTRUCTION, build_prompt
from lessismore.eval.report import compute_rows, write_report
from lessismore.eval.runner import EvalSettings, evaluate, read_records
from lessismore.eval.tasks import DEFAULT_N, TASKS, Problem, load_task

__all__ = [
    "Completion", "DEFAULT_N", "EvalSettings", "GPQA_INSTRUCTION", "Generator", "Grade", "HFGenerator",
    "MATH_INSTRUCTION", "Problem", "SamplingParams", "TASKS", "build_prompt", "compute_rows", "evaluate",
    "grade_response", "last_boxed", "load_task", "pass_at_k", "read_records", "summarize", "write_report",
]
