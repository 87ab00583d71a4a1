import os; os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The models under test are small: one intra-op thread is as fast on 2 cores and does not stall when
# the machine is shared (a busy thread pool made small ops ~100x slower here).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), fp32 on CPU, loaded once per test session."""
    from lessismore.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def chat_prompt(default_model):
    """Chat-formatted AIME-24 problem 60 (the `make run` prompt), as token ids [1, T]."""
    from pathlib import Path

    _, tokenizer = default_model
    problem = (Path(__file__).parent.parent / "examples" / "aime24_problem60.txt").read_text()
    text = tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
