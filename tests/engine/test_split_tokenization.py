"""Tokenizing a request's shared head once and each document's rest apart gives exactly the tokens
of tokenizing each whole pair, on the tiny model's tokenizer and on a Qwen2-style one (NFC
normalizer, the Qwen2 split regex with its `\\s+(?!\\S)` lookahead, byte-level BPE), for
queries and documents chosen to cross the cut: punctuation, newlines, trailing spaces, digits,
accents and combining marks, CJK, emoji, special-token strings and the document tag itself."""

import random

import pytest

from engine.inputs import RerankItem, ScoreRequest
from engine.prepare import head_cut

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
PIECES = [
    "red", " circle", "?", "?\n", "\n\n", "  ", " ", "\t", "<Document>:", "<Query>:", "ÿ", "é", "e\u0301", "数字", "🙂",
    "123", "4.5", "'s", "'re", "--", "!!", ":", "a", "Z", "\r\n", "<|im_end|>", " <", ">", "NULL",
]


def qwen2_style_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = ["".join(rng.choice(PIECES) for _ in range(30)) for _ in range(400)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:])


def _random_text(rng: random.Random, n: int, pieces=PIECES) -> str:
    return "".join(rng.choice(pieces) for _ in range(n))


USER_PIECES = [p for p in PIECES if "<|" not in p]  # prepare refuses special tokens in user text


@pytest.mark.parametrize("which", ["tiny", "qwen2-style"])
def test_head_and_rest_tokenize_to_the_whole(which, engine_for):
    tokenizer = engine_for("fp32").tokenizer if which == "tiny" else qwen2_style_tokenizer()
    specials = tokenizer.all_special_tokens
    rng = random.Random(1)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    checked = 0
    for _ in range(300):
        head = "<|im_start|>user\n<Instruct>: find<Query>:" + _random_text(rng, rng.randint(0, 40))
        cut = head_cut(tokenizer, head, specials)
        assert 0 <= cut <= len(head)
        head_ids = ids(head[:cut])
        for _ in range(5):
            rest = "\n<Document>:" + _random_text(rng, rng.randint(0, 12)) + "<|im_end|>\n<|im_start|>assistant\n"
            assert head_ids + ids(head[cut:] + rest) == ids(head + rest), (head, rest, cut)
            checked += 1
    assert checked == 1500


def test_prepare_tokenizes_each_pair_as_a_whole_render_would(engine_for):
    eng = engine_for("fp32")
    rng = random.Random(2)
    for _ in range(40):
        query = RerankItem(text=_random_text(rng, rng.randint(1, 30), USER_PIECES))
        docs = [RerankItem(text=_random_text(rng, rng.randint(1, 10), USER_PIECES)) for _ in range(4)]
        prepared = eng.prepare(ScoreRequest.of(query, docs))
        for row, doc in zip(prepared.rows, docs):
            whole = eng.tokenizer(eng.render_prompt(query, doc), add_special_tokens=False)["input_ids"]
            assert row.ids.tolist() == whole


@pytest.mark.parametrize("which", ["tiny", "qwen2-style"])
def test_the_raw_batch_encode_gives_the_tokenizers_own_ids(which, engine_for):
    """Prepare encodes with the Rust tokenizer's batch call (no Python wrapper, no offsets): the
    ids the tokenizer's own call gives, for text that crosses every piece boundary; it stands
    down (None: the call answers) while the backend would truncate or pad, which a caller's
    `truncation=`/`padding=` leaves on, and for a class with its own encode path."""
    from engine.prepare import raw_batch_encoder

    tokenizer = engine_for("fp32").tokenizer if which == "tiny" else qwen2_style_tokenizer()
    raw = raw_batch_encoder(tokenizer)
    assert raw is not None
    rng = random.Random(2)
    texts = [_random_text(rng, rng.randint(0, 60)) for _ in range(200)]
    assert raw(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]

    other = qwen2_style_tokenizer()
    raw = raw_batch_encoder(other)
    other(texts[:2], truncation=True, max_length=4)  # leaves the backend truncating
    assert raw(texts[:2]) is None
    other(texts[:2], padding=True)  # turns truncation off, leaves padding on
    assert raw(texts[:2]) is None
    other(texts[:2])  # turns both off
    assert raw(texts) == other(texts, add_special_tokens=False)["input_ids"]

    class OwnEncode(type(other)):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    assert raw_batch_encoder(OwnEncode(tokenizer_object=other.backend_tokenizer)) is None
