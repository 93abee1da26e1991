"""atheris target: the model update reader (ModelUpdate.from_bytes v1 and v2, every policy, resealed, round-trip).

usage: python fuzz/fuzz_update.py [libFuzzer flags] [CORPUS_DIR ...]   (seeds: python fuzz/corpus.py DIR)
"""

from atheris_main import run

if __name__ == "__main__":
    run("update")
