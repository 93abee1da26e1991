"""atheris target: the envelope reader (open_blob for every format id and policy, cursor, content hash).

usage: python fuzz/fuzz_envelope.py [libFuzzer flags] [CORPUS_DIR ...]   (seeds: python fuzz/corpus.py DIR)
"""

from atheris_main import run

if __name__ == "__main__":
    run("envelope")
