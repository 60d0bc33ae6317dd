"""Regenerate the embedded corpus and tokenizer: `python -m epkit.data --build-tokenizer`.

Everything here is original text produced by a seeded program, so the project is free to ship it:
  corpus.txt            plain-text documents separated by blank lines (fables, facts, arithmetic)
  instructions.jsonl    instruction records {"prompt", "response"} and chat records {"messages"}
  tokenizer.json        byte-level BPE trained on both, vocab 512 (fits the `tiny` preset)
  tokenizer_config.json what transformers' AutoTokenizer needs (special tokens, chat template)

Special tokens, in id order as Mixtral numbers them: <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3.
"""
from __future__ import annotations

import json
import os
import random

ASSETS = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# The prompt format of instruction and chat records; the chat template below renders the same text.
ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TURN_END = "\n\n"  # after system and user turns; an assistant turn ends with </s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}### Assistant:\n{{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'system' %}### System:\n{{ m['content'] }}\n\n"
    "{% else %}### User:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

_ANIMALS = ["fox", "owl", "cat", "dog", "hare", "bear", "wolf", "crow", "frog", "goat", "mole", "duck"]
_COLORS = ["red", "blue", "green", "grey", "brown", "white", "black", "golden"]
_PLACES = ["forest", "river", "hill", "meadow", "village", "garden", "valley", "marsh", "cave", "field"]
_FOODS = ["berries", "seeds", "apples", "fish", "bread", "nuts", "carrots", "honey", "grass", "corn"]
_NAMES = ["Ada", "Bram", "Cora", "Dev", "Elin", "Finn", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Lev"]
_VERBS = ["found", "carried", "shared", "hid", "lost", "painted", "counted", "mended", "sold", "planted"]
_THINGS = ["a lantern", "a basket", "a map", "a bell", "a kite", "a stone", "a rope", "a boat", "a coat", "a cup"]
_WEATHER = ["rain", "snow", "wind", "fog", "sun", "thunder"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _fable(r: random.Random) -> str:
    a, b = r.sample(_ANIMALS, 2)
    c, p, f = r.choice(_COLORS), r.choice(_PLACES), r.choice(_FOODS)
    n, v, t, w = r.choice(_NAMES), r.choice(_VERBS), r.choice(_THINGS), r.choice(_WEATHER)
    lines = [
        f"Once there was a {c} {a} who lived near the {p}.",
        f"Every morning the {a} looked for {f}, because {f} were its favourite food.",
        f"One day the {a} met a {b} and {n}, who had {v} {t}.",
        f"\"Why do you need {t}?\" asked the {a}.",
        f"\"The {w} is coming to the {p},\" said {n}, \"and we must be ready.\"",
        f"So the {a} and the {b} helped {n}, and when the {w} came, nobody was afraid.",
        f"That night the {a} shared its {f} with the {b}.",
    ]
    k = r.randint(4, len(lines))
    return " ".join(lines[:k])


def _facts(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(3, 6)):
        a, c, p, f = r.choice(_ANIMALS), r.choice(_COLORS), r.choice(_PLACES), r.choice(_FOODS)
        out.append(r.choice([
            f"The {c} {a} lives in the {p} and eats {f}.",
            f"In the {p} you can find a {a} eating {f}.",
            f"A {a} from the {p} does not like {r.choice(_FOODS)}, but it likes {f}.",
            f"{r.choice(_NAMES)} keeps {r.choice(_THINGS)} in the {p}.",
        ]))
    return " ".join(out)


def _arithmetic(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(3, 6)):
        x, y = r.randint(0, 5), r.randint(0, 5)
        if r.random() < 0.5:
            out.append(f"{_NUMBERS[x]} plus {_NUMBERS[y]} is {_NUMBERS[x + y]}. {x} + {y} = {x + y}.")
        else:
            hi, lo = max(x, y), min(x, y)
            out.append(f"{_NUMBERS[hi]} minus {_NUMBERS[lo]} is {_NUMBERS[hi - lo]}. {hi} - {lo} = {hi - lo}.")
    return " ".join(out)


def _instruction(r: random.Random) -> dict:
    kind = r.randrange(4)
    if kind == 0:
        x, y = r.randint(0, 5), r.randint(0, 5)
        return {"prompt": f"What is {x} plus {y}?", "response": f"{x} plus {y} is {x + y}."}
    if kind == 1:
        a, p, f = r.choice(_ANIMALS), r.choice(_PLACES), r.choice(_FOODS)
        return {"prompt": f"Where does the {a} that eats {f} live?", "response": f"It lives in the {p}."}
    if kind == 2:
        a = r.choice(_ANIMALS)
        return {"prompt": f"Write one sentence about a {a}.",
                "response": f"The {r.choice(_COLORS)} {a} walked to the {r.choice(_PLACES)} to find "
                            f"{r.choice(_FOODS)}."}
    n, t = r.choice(_NAMES), r.choice(_THINGS)
    return {"messages": [
        {"role": "system", "content": "You are a helpful storyteller."},
        {"role": "user", "content": f"Who has {t}?"},
        {"role": "assistant", "content": f"{n} has {t}."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": f"Because the {r.choice(_WEATHER)} is coming."},
    ]}


def build_corpus(seed: int = 0, documents: int = 1200, instructions: int = 600) -> tuple[str, str]:
    r = random.Random(seed)
    makers = [_fable, _facts, _arithmetic]
    docs = [makers[i % 3](r) for i in range(documents)]
    corpus = os.path.join(ASSETS, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n\n".join(docs) + "\n")
    records = os.path.join(ASSETS, "instructions.jsonl")
    with open(records, "w") as f:
        for _ in range(instructions):
            f.write(json.dumps(_instruction(r)) + "\n")
    return corpus, records


def build_tokenizer(files: list[str], out_dir: str = ASSETS, vocab_size: int = VOCAB_SIZE,
                    max_length: int = 512) -> str:
    """Train a byte-level BPE on `files` and write tokenizer.json + tokenizer_config.json to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    # encode(text) adds <s> in front, as the data pipeline does for every document.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}, expected {i}"
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def build_all(seed: int = 0) -> None:
    corpus, records = build_corpus(seed)
    build_tokenizer([corpus, records])
    print(f"wrote {corpus}, {records} and the tokenizer in {ASSETS}")


if __name__ == "__main__":
    build_all()
