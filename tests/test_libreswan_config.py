"""The libreswan ipsec.conf reader against libreswan's own parser (readwriteconf 4.10 and 5.2):
the shared corpus' libreswan configs, and generated ones."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import libreswan_lab
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libreswan_oracle import Verdict, verdict

import ipsec_textfile as it
from conftest import ROOT, require

CORPUS = ROOT.parent / "shared" / "corpus"
SUITES = sorted(libreswan_lab.SUITES)


def ours(config: Path, root: Path | None = None) -> Verdict:
    try:
        tunnels = it.read_libreswan_config(str(config), root=str(root) if root else None)
    except it.ConfigError:
        return Verdict(error=True)
    return Verdict(False, [t.name for t in tunnels], {t.name: t.auto or "ignore" for t in tunnels},
                   {t.name for t in tunnels if t.shunt}, {t.name for t in tunnels if not t.loaded})


def differences(mine: Verdict, theirs: Verdict) -> list[str]:
    if mine.error or theirs.error:
        return [] if mine.error == theirs.error else [f"rejected: ours {mine.error} libreswan {theirs.error}"]
    found = []
    for what, a, b in (("conns", mine.conns, theirs.conns), ("loaded", mine.loaded, theirs.loaded),
                       ("shunts", sorted(mine.shunts), sorted(theirs.shunts))):
        if a != b:
            found.append(f"{what}: ours {a} libreswan {b}")
    return found


@pytest.mark.parametrize("suite", SUITES)
def test_corpus_agreement_with_libreswan(suite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require([] if CORPUS.is_dir() else [str(CORPUS)], "the corpus")
    require(libreswan_lab.missing_tools(), "libreswan's readwriteconf")
    names = sorted(p.name for p in (CORPUS / "ipsec.conf").iterdir()
                   if p.name.startswith(("libreswan__", "libreswan-old__")))
    disagreeing = {}
    for name in names:
        root = tmp_path / name
        includes = CORPUS / "include-roots" / name[: -len(".conf")]
        if includes.is_dir():
            shutil.copytree(includes, root)
        (root / "etc").mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / "ipsec.conf" / name, root / "etc" / "ipsec.conf")
        found = differences(ours(root / "etc/ipsec.conf", root), verdict(suite, root / "etc/ipsec.conf", root))
        if found:
            disagreeing[name] = found
        shutil.rmtree(root)
    with capsys.disabled():
        agreeing = len(names) - len(disagreeing)
        print(f"\nlibreswan {libreswan_lab.SUITES[suite]} corpus agreement: {agreeing}/{len(names)} files "
              f"({100 * agreeing / len(names):.2f} %)")
    # Not yet at 100 %: the reader does not model libreswan's keyword table and value checks
    # (unknown keywords and many bad values reject the file) nor its per-conn semantic
    # checks (address pools, duplicate keys inside one conn). The floor keeps it from slipping.
    assert agreeing >= FLOORS[suite], "\n".join(f"{n}: {d}" for n, d in sorted(disagreeing.items()))


FLOORS = {"bookworm": 51, "trixie": 168}  # measured; 4.10 also rejects keyexchange=ikev1|ikev2

NAMES = st.sampled_from(["a", "b", "site", "%default"])
VALUES = {
    "auto": st.sampled_from(["add", "route", "ondemand", "start", "up", "keep", "ignore"]),
    "also": st.sampled_from(["a", "b", "site", "nowhere"]),
    "type": st.sampled_from(["tunnel", "transport", "passthrough", "drop", "reject"]),
    "authby": st.sampled_from(["secret", "never"]),
    "leftsubnet": st.sampled_from(["10.0.1.0/24", "10.0.2.0/24"]),
}


@st.composite
def configs(draw: st.DrawFn) -> str:
    lines = ["config setup", ""]
    # Distinct names: libreswan keeps two sections of one name as two conns (the later
    # replaces the earlier in pluto), this reader merges them; not modelled yet.
    for name in draw(st.lists(NAMES, min_size=1, max_size=4, unique=True)):
        lines.append(f"conn {name}")
        lines += ["\tleft=192.0.2.1", "\tright=192.0.2.2"] if draw(st.booleans()) else []
        for key in draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=3, unique=True)):
            lines.append(f"\t{key}={draw(VALUES[key])}")
        lines.append("")
    return "\n".join(lines) + "\n"




@pytest.mark.xfail(reason="known gaps of the reader: %default with also=, duplicate conn names, keyword and "
                          "value checks (see test_corpus_agreement_with_libreswan)", strict=False)
@pytest.mark.parametrize("suite", SUITES)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(config=configs())
def test_generated_configs_agree_with_libreswan(suite: str, config: str) -> None:
    require(libreswan_lab.missing_tools(), "libreswan's readwriteconf")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ipsec.conf"
        path.write_text(config)
        found = differences(ours(path), verdict(suite, path))
    assert found == [], config
