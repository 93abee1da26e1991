"""atheris target: the delta reader (delta_from_bytes v1 and v2, bare records sections, round-trip).

usage: python fuzz/fuzz_delta.py [libFuzzer flags] [CORPUS_DIR ...]   (seeds: python fuzz/corpus.py DIR)
"""

from atheris_main import run

if __name__ == "__main__":
    run("delta")
