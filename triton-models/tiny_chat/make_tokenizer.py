"""Builds tiny_chat's tokenizer/tokenizer.json with the Hugging Face `tokenizers` library.

A word-level vocabulary (every word of CORPUS, lower and capitalised, and its punctuation),
split by `Whitespace` (runs of word characters, runs of other marks), with the chat markers
as special tokens so a rendered chat prompt counts them as one token each. Run once; the
output is committed:

    python make_tokenizer.py   # needs `pip install tokenizers`
"""
import os

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SPECIAL = ["[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CORPUS = """
the a an and or but if then else of to in on at by for with from into over under about after
before between through during without within is are was were be been being am do does did
have has had will would can could should may might must shall not no yes all any some many
much more most few less least each every both either neither this that these those it its
he she they we you i me him her them us my your his their our what which who whom whose when
where why how here there now today tomorrow yesterday again once twice always never often
hello hi goodbye thanks thank please sorry welcome good bad great small large big little new
old first last next long short high low fast slow quick early late right left true false
model models token tokens stream streams request requests response responses answer answers
question questions text word words number numbers time times day days year years world
gateway server servers client clients queue queues task tasks batch batches worker workers
triton infergate openai chat completion completions prompt prompts user users assistant
system message messages tell say said write wrote read run runs ran send sent call calls
count counts limit limits quota budget tenant tenants key keys test tests check checks
one two three four five six seven eight nine ten hundred thousand million zero
red green blue black white yellow cat cats dog dogs bird birds fish tree trees sun moon
star stars sky sea water fire earth air light dark city home house road car train plane
is was echo echoes back repeat repeats me you story poem song line lines
""".split()

PUNCT = [".", ",", "!", "?", ":", ";", "'", "\"", "-", "(", ")"]


def main():
    words = sorted(set(CORPUS) | {w.capitalize() for w in CORPUS})
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1)
    tok.train_from_iterator([" ".join(words + PUNCT)], trainer=trainer)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer", "tokenizer.json")
    tok.save(out)
    print(f"{out}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
