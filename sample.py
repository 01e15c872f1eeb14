"""Sample completions from a model: N per prompt, batched over the N with one KV cache.

    python sample.py --prompt "Which season is the best?" -n 8 --temperature 1.2 --min-p 0.1
    python sample.py --model DIR --adapter runs/spl/adapter --prompts prompts.txt -n 16 --json > samples.jsonl

With no --model it samples from the embedded world's reference model (data/world/model/). The tokenizer is the
`tokenizer.model`, `tekken.json` or `tokenizer.json` beside the model (models.load_tokenizer, in that order).
Prompts are user turns in the checkpoint's chat format (models/chat_format.py; chosen from its
tokenizer_config.json or tokenizer file, printed to stderr, `--chat-format NAME` overrides), e.g.
Mistral v1's BOS + enc("[INST] {prompt} [/INST]"), or BOS + enc(prompt) with --no-chat; `--prompts FILE` reads one prompt per
line (a .txt file; blank lines are skipped) or JSONL objects with a "prompt" field (a .jsonl file): a string (one
user turn) or a conversation, a list of {"role", "content"} messages (a system message first, then user and
assistant turns ending with the user's), as training data's prompts are. `--system TEXT` puts a system message
before every prompt that has none. With --adapter and no --model, the base model is the adapter_config.json's
base_model_name_or_path (what train.py trained from), or one line says to pass --model.

Each prompt is prefilled once, its KV cache repeated N times, and the N completions decoded as one batch until
each has emitted EOS or --max-new-tokens tokens (models/generate.py). Sampling: temperature, then top-k, top-p
and min-p, each computed on the tempered distribution (HF transformers' order); temperature 0 is greedy and
ignores the filters. min-p's threshold p_base * max_v p(v) (Nguyen et al. 2024) is therefore taken on the
tempered distribution; implementations differ in this order, and truncating before temperature instead keeps
fewer tokens at T > 1. This follows HF's order; the SPL paper does not state its own. The paper's settings: min-p p_base = 0.1, top-p 0.9, top-k 180 (Section 4.1).

`--json` prints one object per completion: prompt, prompt_index, index (the sample's number within its prompt),
prompt_ids, token_ids (the new tokens, the final EOS included when it came), text (decoded, EOS dropped), eos
(whether it stopped at EOS) and logprob: log pi(token_ids | prompt_ids) under the sampling model (with its
adapter), at temperature 1 and unfiltered, whatever the sampling settings, so it is the model's own
probability of the text, comparable across settings.
"""
from __future__ import annotations

from spl.signals import exit_quietly_on_stop
exit_quietly_on_stop(__name__, "sample.py")  # before torch's import (seconds): a stop signal is one line from here on

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from spl.cli import SEED_LIMIT, ArgumentParser, UsageError, check_fits, check_threads, choose_threads, resolve_device
from data.tokenization import ContextError, check_context
from data.world import MODEL_DIR as DEFAULT_MODEL
from models import CheckpointError, ConfigError, load_adapter, load_pretrained
from models.chat_format import FORMATS as CHAT_FORMATS, ChatFormatError
from data.preferences import parse_prompt
from models.fields import lone_surrogate
from models.generate import Completion, sample_completions, user_prompt_ids
from models.gguf import resolve_model
from models.peft import adapter_base_model
from models.tokenizer import check_vocabulary, describe_format, load_tokenizer
from spl.runs import StopSignals, Stopped


class PromptError(ValueError):
    """A bad prompts file; the message is `path:line: problem`."""


# ---- prompts --------------------------------------------------------------------------------------------------


def read_prompts(path) -> list[str | list[dict]]:
    """Prompts from a .jsonl file (objects with a "prompt": a string, or chat messages ending with a user turn; or,
    as HF chat datasets name them, "messages") or any other file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise PromptError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        except RecursionError:  # a line made to break the parser
            raise PromptError(f"{path}:{number}: not valid JSON (nested too deeply to parse)") from None
        field = next((key for key in ("prompt", "messages") if isinstance(record, dict) and key in record), None)
        if field is None:
            raise PromptError(f'{path}:{number}: missing field "prompt" (or "messages", chat messages)')
        prompts.append(conversation_or_text(record[field], f"{path}:{number}", field))
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return prompts


def conversation_or_text(value, where: str, field: str = "prompt") -> str | list[dict]:
    """A "prompt" field: a non-empty string, or chat messages as training data's (data/preferences.py parse_prompt's
    rules) ending with a user turn; a "messages" field: such messages only. PromptError naming `where` otherwise."""
    def fail(problem):
        raise PromptError(f"{where}: {problem}")

    if field == "messages" and (not isinstance(value, list) or not value):
        fail(f'field "messages" must be a non-empty list of messages, got {value!r:.60}')
    if isinstance(value, str):
        if not value.strip():
            fail(f'field "{field}" must be a non-empty string or a list of messages')
        if lone_surrogate(value):  # "\ud800" in JSON: no tokenizer can encode it
            fail(f'field "{field}" {lone_surrogate(value)}')
        return value
    if not isinstance(value, list) or not value:
        fail(f'field "{field}" must be a non-empty string or a list of messages, got {value!r:.60}')
    messages = parse_prompt(value, field, fail)
    for message in messages:
        if lone_surrogate(message["content"]):
            fail(f'field "{field}" {lone_surrogate(message["content"])}')
    if messages[-1]["role"] != "user":
        fail(f'field "{field}": the last message must be the user\'s turn, got role {messages[-1]["role"]!r}')
    return messages


def with_system(prompt, system: str | None):
    """`prompt` as a conversation with `system` first (--system), unless it has its own system message."""
    if system is None:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]


def print_readable(completions: list[Completion], file=None) -> None:
    file = file or sys.stdout  # looked up at call time, so redirections (and pytest's capsys) apply
    for c in completions:
        if c.index == 0:
            shown = c.prompt if isinstance(c.prompt, str) else " | ".join(f"{m['role']}: {m['content']}"
                                                                          for m in c.prompt)
            print(f"\n=== prompt {c.prompt_index + 1}: {shown}", file=file)
        stop = "eos" if c.eos else "max tokens"
        print(f"[{c.index}] {c.text}\n    ({len(c.token_ids)} tokens, {stop}, logprob {c.logprob:.3f})", file=file)


# ---- the command line -----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"HF-format model directory with its tokenizer, a .gguf file (converted once, "
                                    f"cached) or smollm2 (default: the --adapter's base model, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", help="PEFT-format LoRA adapter directory (e.g. a train.py run's adapter/)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="prompts file: one per line (.txt) or JSONL with a \"prompt\" field (a "
                        "string or a list of chat messages)")
    p.add_argument("--system", help="a system message put before every prompt that has none")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 (or below 1e-5) is greedy (default 1)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float, help="p_base of min-p sampling")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="prompt as BOS + text, without the chat format")
    p.add_argument("--chat-format", choices=CHAT_FORMATS, help="override the checkpoint's chat format")
    p.add_argument("--json", action="store_true", help="one JSON object per completion")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: 1 for models under 10M parameters, else torch's choice; as train.py)")
    args = p.parse_args(argv)
    checks = [
        (all(v is None or math.isfinite(v) for v in (args.temperature, args.top_p, args.min_p)),
         f"--temperature, --top-p and --min-p must be finite numbers, got {args.temperature}, {args.top_p}, "
         f"{args.min_p}"),
        (args.num_samples >= 1, f"-n must be >= 1, got {args.num_samples}"),
        (args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}"),
        (args.top_k is None or args.top_k >= 1, f"--top-k must be >= 1, got {args.top_k}"),
        (args.top_p is None or 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.min_p is None or 0 <= args.min_p <= 1, f"--min-p must be in [0, 1], got {args.min_p}"),
        (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.threads >= 0, f"--threads must be >= 0 (0: automatic), got {args.threads}"),
        (0 <= args.seed < SEED_LIMIT, f"--seed must be in [0, 2^63), got {args.seed}"),
        (args.prompt is None or args.prompt.strip() != "", "--prompt is empty"),
        (not (args.no_chat and args.system is not None), "--system needs the chat format: leave out --no-chat"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    check_threads(args.threads)
    return args


def sampling_bytes(config, num_samples: int, length: int, dtype: str) -> int:
    """Memory one prompt's sampling holds: the KV cache of N rows of `length` tokens (2 x layers x N x length x
    kv heads x head_dim elements) and the float32 logits of N rows (a few copies while filtering)."""
    element = 2 if dtype == "bfloat16" else 4
    cache = 2 * config.num_hidden_layers * num_samples * length * config.num_key_value_heads * config.head_dim
    return cache * element + 4 * num_samples * config.vocab_size * 4


def run(args: argparse.Namespace) -> int:
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    prompts = [with_system(prompt, args.system) for prompt in prompts]
    if args.no_chat and any(isinstance(prompt, list) for prompt in prompts):
        raise UsageError(f"{args.prompts}: its prompts are conversations, which need the chat format: leave out "
                         f"--no-chat")
    model_dir = (resolve_model(args.model) if args.model  # a directory, a .gguf file or smollm2
                 else adapter_base_model(args.adapter) if args.adapter else DEFAULT_MODEL)
    if args.model is None and not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: the embedded world's reference model is not built yet; "
                              f"pass --model DIR")
    device = resolve_device(args.device)
    model = load_pretrained(model_dir, dtype=getattr(torch, args.dtype), device=device).eval()
    choose_threads(args.threads, model.num_parameters(), device)  # 0: one thread for a small model on CPU
    tokenizer, _ = load_tokenizer(model_dir, args.chat_format)  # tokenizer.model, tekken.json or tokenizer.json
    check_vocabulary(tokenizer, model.config.vocab_size, model_dir)
    if args.adapter:
        load_adapter(model, args.adapter)
        model.to(device).eval()
    max_prompt = 0
    for number, text in enumerate(prompts, start=1):  # train.py's rule for --max-length (data/tokenization.py)
        where = "--prompt" if args.prompt is not None else f"{args.prompts}: prompt {number}"
        try:
            length = len(user_prompt_ids(tokenizer, text, not args.no_chat))
        except ChatFormatError as error:  # a conversation this chat format refuses
            raise PromptError(f"{where}: chat format {tokenizer.chat_format}: {error}") from None
        max_prompt = max(max_prompt, length)
        check_context(length + args.max_new_tokens, model.config.max_position_embeddings,
                      f"{where}: {length} tokens + --max-new-tokens {args.max_new_tokens} =", model_dir)
    check_fits(sampling_bytes(model.config, args.num_samples, max_prompt + args.max_new_tokens, args.dtype),
               f"-n {args.num_samples} samples of up to {max_prompt + args.max_new_tokens} tokens (their KV cache "
               f"and logits)", device)
    print(describe_format(tokenizer), file=sys.stderr)  # once every input is checked; stdout holds the completions
    generator = torch.Generator(device=device).manual_seed(args.seed)
    completions = sample_completions(model, tokenizer, prompts, args.num_samples, args.max_new_tokens,
                                     args.temperature, args.top_k, args.top_p, args.min_p, chat=not args.no_chat,
                                     generator=generator)
    if args.json:
        for c in completions:  # JSON has no NaN: a non-finite log-prob (an overflowing model) is null
            record = asdict(c) | {"logprob": c.logprob if math.isfinite(c.logprob) else None}
            print(json.dumps(record, ensure_ascii=False, allow_nan=False))
    else:
        print_readable(completions)
    return 0


def main(argv=None) -> int:
    try:
        with StopSignals(immediate=True, what="stopped"):  # SIGINT/SIGTERM: one line, exit 128 + signal
            return run(parse_args(argv))
    except Stopped as stop:
        return stop.exit("sample.py")
    except SystemExit as exit:  # argparse's own errors (usage printed): return the code instead of exiting
        return int(exit.code or 0)
    except (UsageError, ContextError) as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 2
    except (PromptError, CheckpointError, ConfigError) as error:  # AdapterError is a CheckpointError
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
