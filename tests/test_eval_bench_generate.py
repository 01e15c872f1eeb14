"""eval/bench/generate.py --lora: both sides of the benchmark carry the same adapter, so it times one function.

Oracle: peft, reading the adapter models/peft.py writes onto HF transformers' model of the same checkpoint; its
next-token logits must equal ours (the benchmark itself refuses to time two different functions). Invariant: the
adapter is live, i.e. it moves the logits, so the comparison cannot pass on a zero branch.
"""
import json

import torch

from eval.bench import generate as bench
from models import load_pretrained


def test_lora_on_both_sides_is_one_function(tmp_path):
    hf_model = bench.build_checkpoint(tmp_path / "model")
    ours = load_pretrained(tmp_path / "model").eval()
    prompt = list(range(3, 40))
    with torch.no_grad():
        base = ours(torch.tensor([prompt]))[0, -1]
    hf_lora = bench.attach_lora(hf_model, ours, 4, tmp_path / "adapter")
    with torch.no_grad():
        adapted = ours(torch.tensor([prompt]))[0, -1]
    assert (adapted - base).abs().max() > 1e-2 * base.abs().max()  # the branch changes the function
    assert bench.next_token_difference(hf_lora, ours, prompt) < 1e-5


def test_main_times_online_sampler_beside_generate(capsys):
    assert bench.main(["--threads", "1", "--repeats", "1", "--lora", "2", "-n", "2", "--max-new-tokens", "3",
                       "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["lora"] == 2 and record["logits_difference"] < 1e-5
    assert {"ours_tokens_per_s_1_threads", "online_tokens_per_s_1_threads", "hf_tokens_per_s_1_threads"} <= set(record)
