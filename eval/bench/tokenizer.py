"""Benchmark: preparing preference data with a byte-level BPE (models/bpe.py) against sentencepiece, same text.

    python eval/bench/tokenizer.py                    # 10,000 pairs, prompt ~250 tokens, responses ~150
    python eval/bench/tokenizer.py --pairs 1000 --tokenizer-json DIR/tokenizer.json

The text is HH-RLHF-shaped and generated from a seed: each pair is a multi-turn "\\n\\nHuman: ... \\n\\nAssistant: ..."
prompt of about 250 tokens and two replies of about 150, in varied English with capitals, digits, numbers with
decimals and commas, and punctuation. Each tokenizer, freshly loaded (its word cache empty, as when train.py
starts), turns the same records into examples through the data path (data.tokenization.tokenize_records: the chat
format's prompt and both replies), and is timed on that alone:

    sentencepiece  mistral_common/data/tokenizer.model.v1 (Mistral 7B v0.1, 32000 pieces), chat format mistral-v1
    tekken         mistral_common/data/tekken_240911.json (Mistral-Nemo, 131072 ids), chat format mistral-v3
    tokenizer.json --tokenizer-json PATH (with its tokenizer_config.json), or by default a BPE of 32000 tokens that
                   HF `tokenizers` trains here on the first 2,000 pairs with SmolLM2's pre-tokenizer (Digits, then
                   ByteLevel), chat format ChatML

and the ratio of each BPE's time to sentencepiece's is printed (the target: at most 2). Loading times are printed
apart. The machine may be shared: each tokenizer runs --repeats times, in alternating order (A B C, then C B A,
...), each time freshly loaded, and the fastest of its runs is reported; compare ratios rather than seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.preferences import DataSummary, PreferenceRecord  # noqa: E402
from data.tokenization import tokenize_records  # noqa: E402
from models.bpe import BPETokenizer  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

WORDS = ("the of and to a in is it you that he was for on are with as I his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man year "
         "came show every good me give our under name very through just form sentence great think say help low line "
         "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
         "small end put home read hand port large spell add even land here must big high such follow act why ask men "
         "change went light kind off need house picture try us again animal point mother world near build self earth "
         "father head stand own page should country found answer school grow study still learn plant cover food sun "
         "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
         "draw left late run don't while press close night real life few north open seem together next white children "
         "begin got walk example ease paper group always music those both mark often letter until mile river car feet "
         "care second book carry took science eat room friend began idea fish mountain stop once base hear horse cut "
         "sure watch color face wood main enough plain girl usual young ready above ever red list though feel talk "
         "bird soon body dog family direct pose leave song measure door product black short numeral class wind "
         "question happen complete ship area half rock order fire south problem piece told knew pass since top whole "
         "king space heard best hour better true during hundred five remember step early hold west ground interest "
         "reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay against "
         "pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit "
         "power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest "
         "correct able pound done beauty drive stood contain front teach week final gave green oh quick develop "
         "ocean warm free minute strong special mind behind clear tail produce fact street inch multiply nothing "
         "course stay wheel full force blue object decide surface deep moon island foot system busy test record boat "
         "common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought "
         "heat snow tire bring yes distant fill east paint language among grand ball yet wave drop heart am present "
         "heavy dance engine position arm wide sail material size vary settle speak weight general ice matter circle "
         "pair include divide syllable felt perhaps pick sudden count square reason length represent art subject "
         "region energy hunt probable bed brother egg ride cell believe fraction forest sit race window store summer "
         "train sleep prove lone leg exercise wall catch mount wish sky board joy winter sat written wild instrument "
         "kept glass grass cow job edge sign visit past soft fun bright gas weather month million bear finish happy "
         "hope flower clothe strange gone jump baby eight village meet root buy raise solve metal whether push seven "
         "paragraph third shall held hair describe cook floor either result burn hill safe cat century consider type "
         "law bit coast copy phrase silent tall sand soil roll temperature finger industry value fight lie beat "
         "excite natural view sense ear else quite broke case middle kill son lake moment scale loud spring observe "
         "child straight consonant nation dictionary milk speed method organ pay age section dress cloud surprise "
         "quiet stone tiny climb cool design poor lot experiment bottom key iron single stick flat twenty skin smile "
         "crease hole trade melody trip office receive row mouth exact symbol die least trouble shout except wrote "
         "seed tone join suggest clean break lady yard rise bad blow oil blood touch grew cent mix team wire cost lost "
         "brown wear garden equal sent choose fell fit flow fair bank collect save control decimal gentle woman "
         "captain practice separate difficult doctor please protect noon whose locate ring character insect caught "
         "period indicate radio spoke atom human history effect electric expect crop modern element hit student "
         "corner party supply bone rail imagine provide agree thus capital won't chair danger fruit rich thick "
         "soldier process operate guess necessary sharp wing create neighbor wash bat rather crowd corn compare poem "
         "string bell depend meat rub tube famous dollar stream fear sight thin triangle planet hurry chief colony "
         "clock mine tie enter major fresh search send yellow gun allow print dead spot desert suit current lift "
         "rose continue block chart hat sell success company subtract event particular deal swim term opposite wife "
         "shoe shoulder spread arrange camp invent cotton born determine quart nine truck noise level chance gather "
         "shop stretch throw shine property column molecule select wrong gray repeat require broad prepare salt "
         "nose plural anger claim continent oxygen sugar death pretty skill women season solution magnet silver "
         "thank branch match suffix especially fig afraid huge sister steel discuss forward similar guide experience "
         "score apple bought led pitch coat mass card band rope slip win dream evening condition feed tool total basic "
         "smell valley nor double seat arrive master track parent shore division sheet substance favor connect post "
         "spend chord fat glad original share station dad bread charge proper bar offer segment slave duck instant "
         "market degree populate chick dear enemy reply drink occur support speech nature range steam motion path "
         "liquid log meant quotient teeth shell neck").split()
PUNCTUATION = [",", ",", ".", ".", ".", "?", "!", ";", ":", " -", "'s", "...", ")"]


def sentence(rng: random.Random, length: int) -> str:
    """About `length` words: capitals, numbers (ints, decimals, thousands, years), punctuation."""
    out = []
    for position in range(length):
        draw = rng.random()
        if draw < 0.06:
            word = rng.choice([str(rng.randint(0, 100)), f"{rng.randint(1, 9999):,}", f"{rng.uniform(0, 100):.2f}",
                               str(rng.randint(1900, 2030)), f"{rng.randint(1, 99)}%"])
        else:
            word = rng.choice(WORDS)
            word = word.capitalize() if position == 0 or draw > 0.97 else word
        out.append(word + (rng.choice(PUNCTUATION) if rng.random() < 0.12 else ""))
    return " ".join(out) + rng.choice([".", ".", "?", "!"])


def paragraph(rng: random.Random, words: int) -> str:
    parts, total = [], 0
    while total < words:
        n = rng.randint(6, 22)
        parts.append(sentence(rng, n))
        total += n
    return (" " if rng.random() < 0.8 else "\n").join(parts)


def hh_records(pairs: int, seed: int = 0) -> list[PreferenceRecord]:
    """HH-RLHF-shaped pairs: 1-3 human turns (earlier ones answered), ~150 words of prompt, replies of ~100 words
    (about 250 and 150 tokens in these vocabularies)."""
    rng = random.Random(seed)
    records = []
    for line in range(1, pairs + 1):
        turns = rng.randint(1, 3)
        per_turn = 150 // (2 * turns - 1)
        prompt = []
        for turn in range(turns):
            prompt.append({"role": "user", "content": paragraph(rng, per_turn)})
            if turn < turns - 1:
                prompt.append({"role": "assistant", "content": paragraph(rng, per_turn)})
        records.append(PreferenceRecord(prompt, paragraph(rng, 100), paragraph(rng, 100), line=line))
    return records


def trained_tokenizer_json(records: list[PreferenceRecord], directory: Path) -> Path:
    """A 32000-token BPE trained by HF tokenizers on the first 2,000 pairs, SmolLM2's pre-tokenizer, ChatML."""
    try:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise SystemExit("the default tokenizer.json is trained with HF tokenizers: pip install tokenizers "
                         "(or pass --tokenizer-json PATH)") from None
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    texts = [m["content"] for r in records[:2000] for m in r.prompt] + [r.chosen for r in records[:2000]]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory / "tokenizer.json"


def timed(make, records) -> tuple[float, float, int]:
    """(load seconds, data-path seconds, tokens) for a freshly loaded tokenizer."""
    start = time.perf_counter()
    tokenizer = make()
    loaded = time.perf_counter()
    examples = tokenize_records(records, tokenizer, 1 << 20, 1 << 19, DataSummary(path="bench", sha256=""))
    done = time.perf_counter()
    tokens = sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    return loaded - start, done - loaded, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tokenizer, alternating the order")
    parser.add_argument("--tokenizer-json", help="a tokenizer.json (with its tokenizer_config.json) to time as well")
    args = parser.parse_args(argv)
    import mistral_common  # the real tokenizer files its wheel ships (a dev requirement)

    data = Path(mistral_common.__file__).parent / "data"
    records = hh_records(args.pairs, args.seed)
    with tempfile.TemporaryDirectory() as workdir:
        tekken = Path(workdir) / "tekken" / "tekken.json"
        tekken.parent.mkdir()
        tekken.symlink_to(data / "tekken_240911.json")
        tokenizer_json = Path(args.tokenizer_json) if args.tokenizer_json else trained_tokenizer_json(records,
                                                                                                     Path(workdir))
        runs = {"sentencepiece v1": lambda: Tokenizer(data / "tokenizer.model.v1"),
                "tekken_240911": lambda: BPETokenizer(tekken),
                f"tokenizer.json ({tokenizer_json.name})": lambda: BPETokenizer(tokenizer_json)}
        order, results = list(runs), {}
        for repeat in range(args.repeats):
            for name in order if repeat % 2 == 0 else order[::-1]:
                results[name] = min(results.get(name, (0, float("inf"), 0)), timed(runs[name], records),
                                    key=lambda result: result[1])
    base = results["sentencepiece v1"][1]
    print(f"{args.pairs} HH-RLHF-shaped pairs through data.tokenization.tokenize_records (seed {args.seed}), "
          f"fastest of {args.repeats} runs each")
    print(f"{'tokenizer':<32} {'load s':>7} {'tokenize s':>10} {'tokens':>10} {'tokens/pair':>11} "
          f"{'x sentencepiece':>15}")
    for name, (load, seconds, tokens) in results.items():
        print(f"{name:<32} {load:>7.2f} {seconds:>10.2f} {tokens:>10} {tokens / args.pairs:>11.0f} "
              f"{seconds / base:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
