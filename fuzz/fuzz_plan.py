"""atheris target: the plan blob reader (plan_from_bytes, every signature policy, resealed, round-trip).

usage: python fuzz/fuzz_plan.py [libFuzzer flags] [CORPUS_DIR ...]   (seeds: python fuzz/corpus.py DIR)
"""

from atheris_main import run

if __name__ == "__main__":
    run("plan")
