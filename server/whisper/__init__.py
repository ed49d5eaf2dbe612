"""The only door to faster-whisper and CTranslate2: the runner every decode goes through
(``runner``), and word timing fitted to the speech (``word_timing``). A test pins the
faster-whisper internals the runner relies on (tests/test_runners.py).
"""
