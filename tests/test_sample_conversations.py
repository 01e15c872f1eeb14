"""sample.py for conversations: prompts as message lists, --system, the base model read from the adapter.

Oracles: mistral-common's MistralTokenizer.encode_chat_completion on the real v1 tokenizer (the reference for how
Mistral's models were prompted) for the prompt_ids sample.py feeds the model; the invariant that sampling with
--adapter alone equals sampling with --model DIR --adapter (the base read from adapter_config.json is the model the
adapter was trained on); refusals by their one line.
"""
import json
from pathlib import Path

import pytest

import sample
import train
from models import MistralConfig, build_model, save_pretrained

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

V1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
MESSAGE = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
CONVERSATION = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Best pet?"},
                {"role": "assistant", "content": "Dogs."}, {"role": "user", "content": "And the second best?"}]


def mistral_common_prompt(messages) -> list[int]:
    tokenizer = MistralTokenizer.from_file(str(V1), mode=ValidationMode.test)
    request = ChatCompletionRequest(messages=[MESSAGE[m["role"]](content=m["content"]) for m in messages])
    return tokenizer.encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory):
    config = MistralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                           rope_theta=1e4, sliding_window=None, tie_word_embeddings=False, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("v1") / "model"
    save_pretrained(build_model(config, seed=0), path, tokenizer_path=V1)
    return path


def sampled(capsys, argv):
    assert sample.main([*argv, "--json", "--temperature", "0", "--max-new-tokens", "3", "--threads", "1"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_conversations_and_system_flag_are_prompted_as_mistral_common_does(v1_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": CONVERSATION}) + "\n" + json.dumps({"prompt": "Best season?"}) + "\n",
                       encoding="utf-8")
    first, second = sampled(capsys, ["--model", str(v1_model), "--prompts", str(prompts)])
    assert first["prompt_ids"] == mistral_common_prompt(CONVERSATION) and first["prompt"] == CONVERSATION
    assert second["prompt_ids"] == mistral_common_prompt([{"role": "user", "content": "Best season?"}])
    # --system: before the prompts without one; the conversation keeps its own
    first, second = sampled(capsys, ["--model", str(v1_model), "--prompts", str(prompts), "--system", "Be brief."])
    assert first["prompt_ids"] == mistral_common_prompt(CONVERSATION)
    assert second["prompt_ids"] == mistral_common_prompt([{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Best season?"}])
    (only,) = sampled(capsys, ["--model", str(v1_model), "--prompt", "Best season?", "--system", "Be brief."])
    assert only["prompt_ids"] == second["prompt_ids"]
    # "messages", as HF chat datasets name a conversation, is read as "prompt" is
    prompts.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    (only,) = sampled(capsys, ["--model", str(v1_model), "--prompts", str(prompts)])
    assert only["prompt_ids"] == mistral_common_prompt(CONVERSATION) and only["prompt"] == CONVERSATION


@pytest.mark.parametrize("record, problem", [
    ({"prompt": CONVERSATION[:3]}, "field \"prompt\": the last message must be the user's turn, got role "
                                   "'assistant'"),
    ({"prompt": [{"role": "user"}]}, 'field "prompt" message 0: expected an object with "role" and "content"'),
    ({"prompt": 3}, 'field "prompt" must be a non-empty string or a list of messages, got 3'),
    ({"messages": "Best pet?"}, "field \"messages\" must be a non-empty list of messages, got 'Best pet?'"),
    ({"messages": CONVERSATION[:3]}, "field \"messages\": the last message must be the user's turn, got role "
                                     "'assistant'"),
])
def test_bad_conversations_are_refused_naming_the_line(v1_model, tmp_path, capsys, record, problem):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    assert sample.main(["--model", str(v1_model), "--prompts", str(prompts)]) == 1
    assert capsys.readouterr().err.strip() == f"sample.py: error: {prompts}:2: {problem}"


def test_conversations_need_the_chat_format(v1_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": CONVERSATION}) + "\n", encoding="utf-8")
    assert sample.main(["--model", str(v1_model), "--prompts", str(prompts), "--no-chat"]) == 2
    assert "need the chat format: leave out --no-chat" in capsys.readouterr().err
    assert sample.main(["--model", str(v1_model), "--prompt", "x", "--no-chat", "--system", "s"]) == 2
    assert capsys.readouterr().err.strip() == "sample.py: error: --system needs the chat format: leave out --no-chat"


def test_the_base_model_is_read_from_the_adapter(tiny_run, tmp_path, capsys):
    """An adapter train.py wrote names its base in adapter_config.json: sampling with --adapter alone equals
    sampling with --model (that base) --adapter, token for token; a base that is no directory here is refused."""
    out = tmp_path / "run"
    assert train.main(["--model", str(tiny_run["model"]), "--data", str(tiny_run["data"]), "--out", str(out),
                       "--steps", "2", "--batch-size", "4", "--lr", "5e-2", "--lora-rank", "2", "--max-length", "40",
                       "--max-prompt-length", "24", "--threads", "1", "--no-progress", "--no-plot"]) == 0
    capsys.readouterr()
    adapter = out / "adapter"
    alone = sampled(capsys, ["--adapter", str(adapter), "--prompt", "which pet is best?", "-n", "2"])
    named = sampled(capsys, ["--model", str(tiny_run["model"]), "--adapter", str(adapter), "--prompt",
                             "which pet is best?", "-n", "2"])
    assert alone == named
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.1"
    (adapter / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert sample.main(["--adapter", str(adapter), "--prompt", "x"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"sample.py: error: {adapter / 'adapter_config.json'}: base_model_name_or_path 'mistralai/Mistral-7B-v0.1' "
        f"is not a model directory here; pass --model DIR (the model the adapter was trained on)")
