"""A private apt source for tests: tiny .deb packages built here, listed only by a private APT_CONFIG."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


class AptRepo:
    """Tiny .deb packages built here, served from a `file:` source that only a private APT_CONFIG lists."""

    def __init__(self, base: Path):
        self.base = base
        self.repo = base / "repo"
        self.repo.mkdir(parents=True)
        for sub in ("lists/partial", "cache/archives/partial", "log", "sources.list.d"):
            (base / sub).mkdir(parents=True)
        (base / "sources.list").write_text(f"deb [trusted=yes] file:{self.repo} ./\n")
        self.config = base / "apt.conf"
        self.config.write_text("".join(f'{key} "{value}";\n' for key, value in {
            "Dir::Etc::sourcelist": base / "sources.list", "Dir::Etc::sourceparts": base / "sources.list.d",
            "Dir::State::Lists": base / "lists", "Dir::State::extended_states": base / "extended_states",
            "Dir::Cache": base / "cache", "Dir::Cache::pkgcache": "", "Dir::Cache::srcpkgcache": "",
            "Dir::Log": base / "log", "APT::Sandbox::User": "root"}.items()))
        self.built: list[Path] = []
        self.names: set[str] = set()
        self.index()

    def add(self, name: str, version: str, depends: str = "") -> None:
        """Build NAME_VERSION_all.deb (it installs /usr/share/NAME/version) and rewrite the Packages index."""
        root = self.base / "build" / f"{name}_{version}"
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN/control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: runbook tests <t@example.invalid>\n"
            + (f"Depends: {depends}\n" if depends else "") + "Description: runbook test package\n")
        (root / "usr/share" / name).mkdir(parents=True)
        (root / "usr/share" / name / "version").write_text(version + "\n")
        deb = self.repo / f"{name}_{version}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
        self.built.append(deb)
        self.names.add(name)
        self.index()

    def index(self) -> None:
        """A hand-written Packages file (what dpkg-scanpackages would print) for every built package."""
        entries = []
        for deb in self.built:
            control = subprocess.run(["dpkg-deb", "--field", str(deb)], check=True, capture_output=True, text=True).stdout
            data = deb.read_bytes()
            entries.append(control.rstrip("\n") + f"\nFilename: ./{deb.name}\nSize: {len(data)}\n"
                           f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
        (self.repo / "Packages").write_text("\n".join(entries))

    def deb(self, name: str) -> Path:
        """The newest .deb built for a package."""
        return [d for d in self.built if d.name.startswith(f"{name}_")][-1]

    def install(self, name: str) -> None:
        """Install a built package with dpkg (the machine's own apt lists are not touched)."""
        subprocess.run(["dpkg", "-i", str(self.deb(name))], check=True, capture_output=True)

    def refresh(self) -> None:
        """What `update_cache` does, run by the test itself (into the private lists)."""
        subprocess.run(["apt-get", "-q", "update"], env={**os.environ, "APT_CONFIG": str(self.config)}, check=True,
                       capture_output=True)
