"""atheris target: the UART frame reader (decode_frame, Deframer, payload unpack).

usage: python fuzz/fuzz_frames.py [libFuzzer flags] [CORPUS_DIR ...]   (seeds: python fuzz/corpus.py DIR)
"""

from atheris_main import run

if __name__ == "__main__":
    run("frames")
