"""What tests/test_fuzz.py's cases do against a tree's readers, counted (no assertions): the probe that made
docs/reliability.md's before/after table. Not a test (pytest collects test_*.py only).

    git archive main | tar -x -C /tmp/base && python tests/fuzz_count.py /tmp/base    # main's readers
    python tests/fuzz_count.py .                                                       # this tree's
"""
import collections, importlib.util, json, sys, tempfile
from pathlib import Path
TESTS = Path(__file__).resolve().parent
tree = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(tree))
sys.path.insert(1, str(TESTS))
import torch
torch.set_num_threads(1)
from conftest import train_tiny_tokenizer
spec = importlib.util.spec_from_file_location("fuzz", TESTS / "test_fuzz.py")
fuzz = importlib.util.module_from_spec(spec); spec.loader.exec_module(fuzz)
from models import MistralConfig, build_model, save_pretrained, load_pretrained, add_lora, save_adapter
root = Path(tempfile.mkdtemp())
tok = train_tiny_tokenizer(root / "sp")
config = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=None,
                       tie_word_embeddings=False, max_position_embeddings=512)
save_pretrained(build_model(config, seed=0), root / "model", tokenizer_path=tok)
(root / "model" / "manifest.json").unlink()
(root / "model" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "added_tokens_decoder": {
    "1": {"content": "<s>", "special": True}}, "clean_up_tokenization_spaces": False}))
model = load_pretrained(root / "model")
save_pretrained(model, root / "sharded", max_shard_bytes=20_000, tokenizer_path=root / "model" / "tokenizer.model")
(root / "sharded" / "manifest.json").unlink()
add_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj")); save_adapter(model, root / "adapter")
(root / "adapter" / "manifest.json").unlink()
rows = [{"prompt": f"which pet is best? {i}", "chosen": "dogs are loyal", "rejected": "fish are quiet",
         "chosen_prob": 0.75} for i in range(24)]
(root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
counts, bad = collections.Counter(), collections.Counter()
cases = fuzz.fuzz_cases(root)
for path, name, raw, reader in cases:
    original = path.read_bytes() if path.exists() else None
    path.write_bytes(raw if raw is not None else original[:len(original) // 2])
    try:
        reader(path); counts["read"] += 1
    except fuzz.EXPECTED[path.name] as error:
        counts["refused in one line" if "\n" not in str(error) else "refused, several lines"] += 1
    except Exception as error:
        counts["other exception (a traceback)"] += 1; bad[f"{path.name}: {type(error).__name__}"] += 1
    finally:
        path.write_bytes(original) if original is not None else path.unlink()
print(len(cases), dict(counts)); print(dict(bad))
