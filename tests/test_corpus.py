"""Agreement with strongSwan's own starter on 1384 real ipsec.conf files (shared corpus)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ipsec_textfile as it
from conftest import ROOT, require

CORPUS = ROOT.parent / "shared" / "corpus"


def verdict(name: str, tmp: Path) -> dict[str, object]:
    """Our verdict on one corpus file, placed as the oracle placed it: as /etc/ipsec.conf."""
    root = tmp / name
    includes = CORPUS / "include-roots" / name[: -len(".conf")]
    if includes.is_dir():
        shutil.copytree(includes, root)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    shutil.copy(CORPUS / "ipsec.conf" / name, root / "etc" / "ipsec.conf")
    try:
        tunnels = it.read_config(str(root / "etc" / "ipsec.conf"), root=str(root))
    except it.ConfigError as e:
        return {"loaded": [], "ignored": [], "error": str(e), "shunts": []}
    finally:
        shutil.rmtree(root)
    return {
        "loaded": [t.name for t in tunnels if t.loaded],
        "ignored": [t.name for t in tunnels if not t.loaded],
        "error": None,
        "shunts": [t.name for t in tunnels if t.loaded and t.shunt],
    }


def test_parser_agrees_with_starter_on_the_whole_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require([] if (CORPUS / "expected.json").exists() else [str(CORPUS)], "the corpus")
    expected = json.loads((CORPUS / "expected.json").read_text())
    disagreements = []
    for name, want in sorted(expected.items()):
        got = verdict(name, tmp_path)
        for key in ("loaded", "ignored", "shunts"):
            if got[key] != want.get(key, []):
                disagreements.append(f"{name}: {key}: ours {got[key]} starter {want.get(key, [])}")
        if bool(got["error"]) != bool(want["error"]):
            disagreements.append(f"{name}: error: ours {got['error']!r} starter {want['error']!r}")
    agreeing = len(expected) - len({d.split(":")[0] for d in disagreements})
    with capsys.disabled():
        print(f"\ncorpus agreement: {agreeing}/{len(expected)} files "
              f"({100 * agreeing / len(expected):.2f} %)")
    assert disagreements == []
