"""The libreswan lab's guests: the kernel they boot is the one cached (an older lab's
entries are removed), and a guest that dies at boot says why (its console), not only
that it timed out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import libreswan_lab
from conftest import require


def test_a_guest_whose_init_fails_fails_with_its_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require(libreswan_lab.missing_tools(), "the libreswan lab")
    monkeypatch.setattr(libreswan_lab, "GUEST_INIT", "#!/bin/sh\necho init gives up on purpose\nexit 3\n")
    # What an older lab left: a kernel by another key, and its lock.
    stale = libreswan_lab.CACHE / "uml-bookworm-0000000000000000"
    (stale / "tree").mkdir(parents=True, exist_ok=True)
    (libreswan_lab.CACHE / f"{stale.name}.lock").touch()
    with pytest.raises(RuntimeError) as failure:
        libreswan_lab.boot("bookworm", tmp_path, "", "", [], []).destroy()
    message = str(failure.value)
    assert "guest gw panicked" in message
    assert "init gives up on purpose" in message  # what init said before the panic
    assert "Attempted to kill init" in message
    # The kernel that booted is the one whose modules the lab loads (one cache entry, not two).
    uml = libreswan_lab.kernel()
    booted = re.search(r"^Linux version (\S+)", (tmp_path / "gw/console.log").read_text(), re.MULTILINE)
    assert booted is not None
    assert [d.name for d in (uml.modules / "usr/lib/uml/modules").iterdir()] == [booted.group(1)]
    assert "user-mode-linux " in uml.versions
    assert not stale.exists() and not (libreswan_lab.CACHE / f"{stale.name}.lock").exists()
    assert (libreswan_lab.CACHE / libreswan_lab.root_key("bookworm") / "usr/libexec/ipsec/pluto").exists()
