"""atheris target: the JSON control-message parser (device_agent.wire.messages.parse), nested JSON included.

usage: python fuzz/fuzz_messages.py [libFuzzer flags] [CORPUS_DIR ...]   (seeds: python fuzz/corpus.py DIR)
"""

from atheris_main import run

if __name__ == "__main__":
    run("messages")
